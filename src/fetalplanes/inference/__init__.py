"""From prepared pixels to results: backends, the Predictor, calibration, rejection,
ensembles, explanations and sorting."""
