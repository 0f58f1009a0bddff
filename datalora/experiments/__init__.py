"""Scripts that produce the evidence numbers under ``benchmarks/results/`` (LoRA-TLE, TITOK)."""
