"""HF <-> Megatron checkpoint conversion; mapping.py is the one name/shape table."""
