"""rotgraph: rotation-based quantization (QuaRot, SpinQuant) as compiler passes on ONNX language models.

The Python API mirrors the command line. `import rotgraph` is light (onnx_ir and numpy): the names
that need onnxruntime or torch are imported from their modules when first used.

Exported by `rotgraph` itself (`__all__`):
- `discover`, `ModelDescription`: structure discovery (what `rotgraph describe` prints);
- `canonicalize`, `rotate`, `rotate_model`, `RotateOptions`, `RotateReport`: the float rotation
  pipeline (`rotgraph rotate`), from `rotgraph.pipeline`;
- `quantize_model`, `QuantOptions`: quantization of a loaded model, from `rotgraph.quantize`;
- `activation_stats`: the outlier table of `rotgraph inspect`, from `rotgraph.stats`;
- `write_report`: the report folder of `rotgraph inspect -o DIR`, from `rotgraph.report`;
- `RotgraphError`, `StructureError`, `ValidationError`: the errors rotgraph raises.

The other commands' functions are reached through their modules: `rotgraph export` is
`rotgraph.export.export`, `quantize` `rotgraph.quantize.quantize`, `learn` `rotgraph.learn.learn`, `eval`
`rotgraph.evaluate.evaluate`, `generate` `rotgraph.generate.generate`; `describe` prints
`rotgraph.structure.summary.summary` of the canonicalized model, and `demo` runs export, rotate and eval.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rotgraph.errors import RotgraphError, StructureError, ValidationError
from rotgraph.structure import ModelDescription, discover

if TYPE_CHECKING:
    from rotgraph.pipeline import RotateOptions, RotateReport, canonicalize, rotate, rotate_model
    from rotgraph.quantize import QuantOptions, quantize_model
    from rotgraph.report import write_report
    from rotgraph.stats import activation_stats

# name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {
    "RotateOptions": "rotgraph.pipeline",
    "RotateReport": "rotgraph.pipeline",
    "canonicalize": "rotgraph.pipeline",
    "rotate": "rotgraph.pipeline",
    "rotate_model": "rotgraph.pipeline",
    "QuantOptions": "rotgraph.quantize",
    "quantize_model": "rotgraph.quantize",
    "activation_stats": "rotgraph.stats",
    "write_report": "rotgraph.report",
}

__all__ = [
    "ModelDescription",
    "QuantOptions",
    "RotateOptions",
    "RotateReport",
    "RotgraphError",
    "StructureError",
    "ValidationError",
    "activation_stats",
    "canonicalize",
    "discover",
    "quantize_model",
    "rotate",
    "rotate_model",
    "write_report",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rotgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
