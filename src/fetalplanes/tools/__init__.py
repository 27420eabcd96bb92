"""Tools built on the lower layers: export, benchmarks, demo, downloads, de-identification."""
