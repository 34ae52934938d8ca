"""The text `rotgraph describe` prints: what discovery found and which Hadamard sizes the model needs.

Imports go one way: this module reads the description (`rotgraph.structure.model`), which knows nothing of it.
"""

from __future__ import annotations

from rotgraph.hadamard import hadamard_factors
from rotgraph.structure.model import ModelDescription


def summary(desc: ModelDescription) -> str:
    """One line per part: blocks, attention layout, MLP, norms, lm_head, KV cache, Hadamard sizes."""
    a = desc.blocks[0].attention
    m = desc.blocks[0].mlp
    has_bias = any(lin.bias is not None for b in desc.blocks for lin in (b.attention.q, b.attention.k, b.attention.v))
    lines = [
        f"decoder: {len(desc.blocks)} blocks, hidden {desc.hidden_size}, vocab {desc.vocab_size}",
        f"attention: {a.num_heads} query heads, {a.num_kv_heads} KV heads "
        f"({'grouped-query' if a.num_kv_heads != a.num_heads else 'multi-head'}), head_dim {a.head_dim}, "
        f"Q/K/V biases: {'yes' if has_bias else 'no'}, RoPE: {'found' if a.q_rope is not None else 'not found'}",
        f"attention kind: {a.kind}",
        f"mlp: gated, intermediate {m.down.shape[0]}",
        f"norms: {len(desc.norms())} {desc.final_norm.node.op_type}",
        f"lm_head: {'tied to the embedding' if desc.lm_head_tied else 'own weight'}",
        f"KV cache: {_cache_summary(desc)}",
        f"Hadamard sizes: R1 {factorization(desc.hidden_size)}, R2/R3 {factorization(a.head_dim)}, "
        f"R4 {factorization(m.down.shape[0])}",
    ]
    return "\n".join(lines)


def _cache_summary(desc: ModelDescription) -> str:
    caches = [c for b in desc.blocks for c in (b.attention.key_cache, b.attention.value_cache) if c is not None]
    fused = [a.fused for a in (b.attention for b in desc.blocks) if a.fused is not None]
    held = [n for n in fused if any(v is not None and v.is_graph_input() for v in n.inputs)]
    if not caches and held:
        return f"inside {len(held)} fused {held[0].op_type} nodes (their past/present inputs and outputs)"
    if not caches:
        return "none (the graph recomputes the whole sequence)"
    kind = "integer codes + scales" if caches[0].quantized else "float"
    return f"{len(caches)} past/present pairs ({kind})"


def factorization(n: int) -> str:
    """How a Hadamard matrix of order n is built (2^k or m*p), or that none is known."""
    f = hadamard_factors(n)
    if f is None:
        return f"{n} (no Hadamard known: random orthogonal for R1/R2, no online R3/R4)"
    if n & (n - 1) == 0:
        return f"{n} = 2^{n.bit_length() - 1}"
    return f"{n} = {f.m}*{f.p}"
