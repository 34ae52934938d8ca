"""rotgraph's names in the files it writes: its operator domain and its `metadata_props` keys.

Each is defined here once; passes, the pipeline, the exporter and the readers of models import them.
"""

from __future__ import annotations

# The domain of rotgraph's own operators (Hadamard, FakeQuant, KVQuantize, KVDequantize) and of the
# model-local functions that define them; the C++ kernels register the same name.
ROTGRAPH_DOMAIN = "rotgraph"
# onnxruntime's contrib operators (fused attention, norms, MatMulNBits ...).
MS_DOMAIN = "com.microsoft"

# Written by `rotgraph export`.
CONFIG_KEY = "rotgraph.config"  # JSON: the Hugging Face config fields rotgraph reads (head_dim, eos ...)
SOURCE_KEY = "rotgraph.source"  # the model id or folder the graph was exported from
EXPORTER_KEY = "rotgraph.exporter"  # "dynamo" or "torchscript"
CHAT_TEMPLATE_KEY = "rotgraph.chat_template"  # the tokenizer's chat template, when it has one

# Written by `rotgraph rotate` and its passes: provenance of each rotation.
ROTATION_KEY = "rotgraph.rotation"  # JSON: the method (quarot/spinquant) and the online rotations
R1_KEY = "rotgraph.r1"  # JSON: kind, size and seed of the residual rotation
R2_KEY = "rotgraph.r2"  # JSON: kinds and seed of the per-layer head rotations
R3_KEY = "rotgraph.r3"  # the online Hadamard after RoPE on queries and keys
R4_KEY = "rotgraph.r4"  # the online Hadamard before down_proj
OUT_HADAMARD_KEY = "rotgraph.o_hadamard"  # the online Hadamard before o_proj
KEY_MEAN_KEY = "rotgraph.key_mean"  # the calibrated key means subtracted before the KV cache
ACTIVATION_MEAN_KEY = "rotgraph.activation_mean"  # the projection inputs' means subtracted (as biases)
SCALES_KEY = "rotgraph.scales"  # JSON: the sites a learned per-channel scaling was folded into

# Written by the canonical form: the names of the residual stream's values between blocks (JSON list),
# where a graph lowered for onnxruntime is cut into blocks (`rotgraph.segments.cuts`).
BLOCKS_KEY = "rotgraph.blocks"

# Written when onnxruntime's fused norms were expanded (canonical form): how many, to fuse them again.
ORT_NORMS_KEY = "rotgraph.ort_norms"

# Written by `rotgraph quantize`.
QUANTIZATION_KEY = "rotgraph.quantization"  # JSON: the quantization options
RECIPE_KEY = "rotgraph.recipe"  # JSON: the resolved configuration and rotgraph's version (`rotgraph.config.recorded`)
SMOOTHQUANT_KEY = "rotgraph.smoothquant"  # JSON: SmoothQuant's alpha and the smoothed sites

# The `format` metadata of the safetensors files `rotgraph learn` writes.
ROTATIONS_FORMAT = "rotgraph-rotations"
