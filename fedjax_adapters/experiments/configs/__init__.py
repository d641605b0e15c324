"""Experiment configs; each names the paper table (and row/column) it reproduces."""
