"""Metrics: accuracy, mse, ROUGE."""
