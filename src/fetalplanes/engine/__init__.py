"""Training and evaluation: the Trainer, evaluation reports, cross-validation, tuning,
metrics and plots."""
