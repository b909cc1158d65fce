"""Evaluation: metrics and predictions."""
