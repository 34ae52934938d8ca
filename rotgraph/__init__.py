"""rotgraph: rotation-based quantization (QuaRot, SpinQuant) as compiler passes on ONNX language models.

The Python API mirrors the command line: `export`, `rotate`, `evaluate`, `activation_stats`.
"""

from rotgraph.errors import RotgraphError, StructureError, ValidationError
from rotgraph.pipeline import RotateOptions, RotateReport, canonicalize, rotate, rotate_model
from rotgraph.structure import ModelDescription, discover

__all__ = [
    "ModelDescription",
    "RotateOptions",
    "RotateReport",
    "RotgraphError",
    "StructureError",
    "ValidationError",
    "canonicalize",
    "discover",
    "rotate",
    "rotate_model",
]
__version__ = "0.1.0"
