"""rotgraph's graph passes, one per module, on onnx_ir's pass infrastructure."""

from rotgraph.passes.canonicalize_norms import CanonicalizeNormsPass
from rotgraph.passes.down_hadamard import InsertDownHadamardPass
from rotgraph.passes.expand_ort_ops import ExpandOrtFusedOpsPass
from rotgraph.passes.fuse_norm_scales import FuseNormScalesPass
from rotgraph.passes.group_query_attention import GroupQueryAttentionPass
from rotgraph.passes.out_hadamard import InsertOutHadamardPass
from rotgraph.passes.qk_hadamard import InsertQKHadamardPass
from rotgraph.passes.rotate_heads import RotateHeadsPass
from rotgraph.passes.rotate_residual import RotateResidualPass
from rotgraph.passes.smooth import SmoothQuantPass
from rotgraph.passes.split_fused import SplitFusedProjectionsPass
from rotgraph.passes.untie_embedding import UntieEmbeddingPass

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
