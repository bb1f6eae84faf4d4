"""Metrics: each declares its direction; rows go to results/<run>/metrics.csv."""
