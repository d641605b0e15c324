"""Experiment runners that reproduce the papers' tables with fedjax_adapters."""
