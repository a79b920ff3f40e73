"""Convergence benchmark (see run.py)."""
