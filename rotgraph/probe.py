"""Run a model over token windows with chosen intermediate values as extra outputs.

The one mechanism behind every statistic rotgraph measures inside a model: calibration (X^T X for
GPTQ, per-channel maxima for SmoothQuant) and `inspect`'s outlier statistics. No copy of the model is
saved for it: the graph (with the extra outputs) is serialized in memory and onnxruntime reads the
weights from the external-data file they already live in. Weights that exist only in memory (lazy
rewrites: rotated, smoothed, fused) are first written once into a scratch file in a folder the
caller owns (beside the output, inside its staging folder), and the model is pointed at that file:
every later probe, pass and the final save read them from there, so each rotation is computed once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from rotgraph.errors import RotgraphError
from rotgraph.weights import SpillFile

logger = logging.getLogger(__name__)

# In-memory initializer bytes that may be serialized inline with the graph; more are written to scratch.
INLINE_LIMIT = 64 << 20
# Tensors from this size on are materialized into scratch (smaller ones, such as the shape constants
# onnxruntime must read while it infers shapes, stay inline).
MATERIALIZE_BYTES = 1024


def _external_folders(model: ir.Model) -> set[str]:
    return {
        os.path.abspath(t.base_dir)
        for v in model.graph.initializers.values()
        if isinstance(t := v.const_value, ir.ExternalTensor)
    }


def _inline_bytes(model: ir.Model) -> int:
    return sum(
        t.nbytes
        for v in model.graph.initializers.values()
        if (t := v.const_value) is not None and not isinstance(t, ir.ExternalTensor)
    )


def materialize(model: ir.Model, scratch: Path) -> int:
    """Write every large initializer that is not already in `scratch`'s weights file there (lazy
    rewrites are computed now, once) and point the model at it; returns the bytes written."""
    scratch.mkdir(parents=True, exist_ok=True)
    written = SpillFile(scratch).spill(model.graph, everything=True, min_bytes=MATERIALIZE_BYTES)
    logger.debug("materialized %.1f MB of weights in %s", written / 1e6, scratch)
    return written


def serialized(model: ir.Model, scratch: Path | None) -> tuple[bytes, Path | None]:
    """The model as bytes plus the folder its external data lies in. With `scratch`, weights held in
    memory are materialized there first (so they are computed once); without it they are serialized
    inline, up to INLINE_LIMIT bytes."""
    folders = _external_folders(model)
    if scratch is not None or len(folders) > 1 or _inline_bytes(model) > INLINE_LIMIT:
        if scratch is None:
            raise RotgraphError(
                "running this model needs a scratch folder: its weights are rewritten in memory "
                f"({_inline_bytes(model) / 1e6:.0f} MB) or spread over {len(folders)} folders"
            )
        materialize(model, scratch)
        folders = _external_folders(model)
    proto = ir.serde.serialize_model(model)
    data = proto.SerializeToString()
    return data, Path(next(iter(folders))) if folders else None


def probe(
    model: ir.Model,
    values: Sequence[ir.Value],
    token_windows: np.ndarray,
    *,
    scratch: Path | None = None,
    optimization: str = "disable",
    what: str = "probe",
    progress: bool = False,
) -> Iterator[list[np.ndarray]]:
    """For each window of `token_windows` [n, seq], the arrays of `values` (in order) computed by
    onnxruntime on that window. The model is left as it was (its extra outputs are removed again);
    only its weights may have moved into `scratch` (see `materialize`)."""
    from rotgraph.evaluate import make_session, model_feeds

    added = [v for v in dict.fromkeys(values) if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        data, folder = serialized(model, scratch)
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    names = [v.name or "" for v in values]
    if any(not name for name in names) or len(set(names)) != len(set(map(id, values))):
        raise RotgraphError(f"probed values need distinct names, got {names}")
    session = make_session(data, optimization, kernels=False, external_data_folder=folder)
    for window in tqdm(token_windows, desc=what, unit="window", disable=not progress, leave=False):
        yield [np.asarray(x) for x in session.run(names, model_feeds(session, window[None, :]))]
