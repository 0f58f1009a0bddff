"""Benchmarks of datalora's MoLoRA ops against the real alternatives (see molora.py)."""
