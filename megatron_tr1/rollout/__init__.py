"""Rollout engines and weight sync."""
