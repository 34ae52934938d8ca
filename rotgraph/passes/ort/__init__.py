"""Lowering for onnxruntime (the ort and genai formats): GroupQueryAttention, RoPE inside it, packed QKV and gate/up, its quantized KV cache, the shared KV buffer, fused norms."""
