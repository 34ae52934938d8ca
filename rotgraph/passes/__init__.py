"""rotgraph's graph passes, one per module, on onnx_ir's pass infrastructure, in a subpackage per phase of
the pipeline, in the order they run:

- `canonical`: one form for every exporter's graph (opset-23 RMSNorm, fused ops expanded, untied lm_head);
- `rotation`: the float rotation (norm scales, R1, R2, the online Hadamards, learned scales);
- `calibration`: calibrated exact float rewrites (SmoothQuant, centered inputs and keys);
- `quantization`: activation, KV-cache and weight quantizers;
- `ort`: lowering for onnxruntime (GroupQueryAttention, packed projections, its quantized cache);
- `qdq`: lowering to standard QDQ ONNX for edge compilers.

The passes the float pipeline names are re-exported here."""

from rotgraph.passes.calibration.smooth import SmoothQuantPass
from rotgraph.passes.canonical.canonicalize_norms import CanonicalizeNormsPass
from rotgraph.passes.canonical.expand_ort_ops import ExpandOrtFusedOpsPass
from rotgraph.passes.canonical.split_fused import SplitFusedProjectionsPass
from rotgraph.passes.canonical.untie_embedding import UntieEmbeddingPass
from rotgraph.passes.ort.group_query_attention import GroupQueryAttentionPass
from rotgraph.passes.rotation.down_hadamard import InsertDownHadamardPass
from rotgraph.passes.rotation.fuse_norm_scales import FuseNormScalesPass
from rotgraph.passes.rotation.out_hadamard import InsertOutHadamardPass
from rotgraph.passes.rotation.qk_hadamard import InsertQKHadamardPass
from rotgraph.passes.rotation.rotate_heads import RotateHeadsPass
from rotgraph.passes.rotation.rotate_residual import RotateResidualPass

__all__ = [
    "CanonicalizeNormsPass",
    "ExpandOrtFusedOpsPass",
    "FuseNormScalesPass",
    "GroupQueryAttentionPass",
    "InsertDownHadamardPass",
    "InsertOutHadamardPass",
    "InsertQKHadamardPass",
    "RotateHeadsPass",
    "RotateResidualPass",
    "SmoothQuantPass",
    "SplitFusedProjectionsPass",
    "UntieEmbeddingPass",
]
