"""Quantization: per-token activation and KV-cache quantizers, static activation Q/DQ, and the weights (RTN, GPTQ)."""
