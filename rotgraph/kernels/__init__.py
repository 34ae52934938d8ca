"""rotgraph's compiled onnxruntime kernels (`librotgraph_ops.so`, built by scripts/build_kernels.sh).

The library registers CPU kernels for the ops of the `rotgraph` domain (Hadamard, FakeQuant, KVQuantize,
KVDequantize; see rotgraph_ops.cc). A model needs no library to run: each op is also an ONNX function in
the model. With the library registered in a session, onnxruntime runs the compiled kernels instead of
inlining the function bodies. The kernels read their configuration from node attributes that rotgraph
writes beside each overload; a model written before those attributes existed runs on the function bodies.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from rotgraph.errors import RotgraphError
from rotgraph.structure import ROTGRAPH_DOMAIN

LIBRARY = Path(__file__).with_name("librotgraph_ops.so")
BUILD_HINT = "build it with `bash scripts/build_kernels.sh` (scripts/setup.sh does)"
# The attribute each op's kernel cannot do without (Hadamard: `a`, unless n is a power of two).
_REQUIRED = {"FakeQuant": "bits", "KVQuantize": "head_dim", "KVDequantize": "head_dim"}


def library_path() -> Path | None:
    """The built library, or None. ROTGRAPH_KERNELS=0 in the environment hides it."""
    if os.environ.get("ROTGRAPH_KERNELS", "1") == "0":
        return None
    return LIBRARY if LIBRARY.is_file() else None


def missing_attributes(path: Path) -> list[str]:
    """rotgraph-domain nodes of the model at `path` that the kernels cannot run (written by an older
    rotgraph, without the attributes the kernels read). Loads the graph only, not external data."""
    model = onnx.load(str(path), load_external_data=False)
    missing = []
    graphs = [model.graph] + [f for f in model.functions]  # type: ignore[list-item]
    for graph in graphs:
        for node in graph.node:
            if node.domain != ROTGRAPH_DOMAIN:
                continue
            need = _REQUIRED.get(node.op_type)
            if node.op_type == "Hadamard" and not _is_power_of_two(node.overload):
                need = "a"  # the m x m matrix of an n = m * 2^k transform
            if need and need not in {a.name for a in node.attribute}:
                missing.append(node.name or node.op_type)
    return missing


def _is_power_of_two(overload: str) -> bool:
    n = int(overload[1:]) if overload[:1] == "n" and overload[1:].isdigit() else 0
    return n > 0 and n & (n - 1) == 0


def register(options: ort.SessionOptions, path: Path, kernels: bool | None) -> bool:
    """Register the library in `options` for the model at `path`. kernels=None: when it is built and the
    model carries the attributes; True: required (error otherwise); False: never. Says whether it did."""
    if kernels is False:
        return False
    library = library_path()
    if library is None:
        if kernels:
            raise RotgraphError(f"rotgraph's kernels are not built ({LIBRARY} is missing): {BUILD_HINT}")
        return False
    missing = missing_attributes(path)
    if missing:
        if kernels:
            raise RotgraphError(
                f"{path}: {len(missing)} rotgraph nodes lack the attributes the kernels read (written by an older "
                f"rotgraph; first: {missing[0]}); requantize, or run without kernels"
            )
        return False
    options.register_custom_ops_library(str(library))
    return True
