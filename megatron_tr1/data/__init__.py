"""Data: annotations, videos, Qwen2.5-VL preprocessing, synthetic data."""
