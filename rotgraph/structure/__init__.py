"""Structure discovery: find a decoder-only transformer in an ONNX graph by pattern, never by name.

The walk starts at the embedding Gather (the only Gather of a 2-D float initializer by a graph
input) and follows the residual stream: each block is an RMSNorm read by the Q/K/V MatMuls, a residual
Add whose other operand is the O MatMul, an RMSNorm read by the gate/up MatMuls and a residual Add fed
by the down MatMul; the stream ends in the final RMSNorm and the lm_head MatMul that produces a graph
output. Attention is identified by data flow: V reaches the second attention MatMul (probabilities x
values), Q and K reach the first one as its left and right operand; RoPE is found by walking back from
the score MatMul through layout ops. Norms must be in canonical form (RMSNormalization or
SimplifiedLayerNormalization); `CanonicalizeNormsPass` produces it from decomposed graphs.

Every mismatch raises `StructureError` saying what was expected and where.

Modules: `model` (the description's dataclasses), `match` (graph-walking matchers), `attention`
(attention, RoPE, KV cache, head layout), `discover` (the walk), `folds` (where R1 and R2 fold),
`summary` (the text `rotgraph describe` prints; it reads `model`, which does not import it).
"""

from rotgraph.structure.discover import check_supported, discover
from rotgraph.structure.folds import (
    R2Pair,
    r1_readers,
    r1_writers,
    r2_pairs,
    rotate_head_columns,
    rotate_head_columns_in,
    rotate_head_rows,
)
from rotgraph.structure.match import before_fake_quant, is_constant_shift, is_hadamard, is_norm, is_rotgraph_op
from rotgraph.structure.model import (
    MLP,
    Attention,
    Block,
    KVCache,
    Linear,
    ModelDescription,
    Norm,
    distinct,
    is_quantized_weight,
    static_shape,
    transposed_initializer,
)

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "KVCache",
    "Linear",
    "ModelDescription",
    "Norm",
    "R2Pair",
    "before_fake_quant",
    "check_supported",
    "discover",
    "distinct",
    "is_constant_shift",
    "is_hadamard",
    "is_norm",
    "is_quantized_weight",
    "is_rotgraph_op",
    "r1_readers",
    "r1_writers",
    "r2_pairs",
    "rotate_head_columns",
    "rotate_head_columns_in",
    "rotate_head_rows",
    "static_shape",
    "transposed_initializer",
]
