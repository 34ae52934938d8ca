"""Lazy float64 rewrites of initializers.

Passes never materialize rewritten weights. `rewrite_initializer` replaces an initializer's tensor by
an `ir.LazyTensor` that, when the model is saved, reads the original (memory-mapped) tensor once,
converts it to float64, applies every queued step in order and casts back to the original dtype once.
Several passes rewriting the same weight therefore cost one float32 rounding, and the pipeline holds
no second copy of the weights in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError

Step = Callable[[np.ndarray], np.ndarray]


class _Chain:
    """Callable for `ir.LazyTensor`: base tensor -> float64 -> steps -> original dtype."""

    def __init__(self, base: ir.TensorProtocol, steps: tuple[Step, ...], name: str | None) -> None:
        self.base = base
        self.steps = steps
        self.name = name

    def float64(self) -> np.ndarray:
        array = np.array(self.base.numpy(), dtype=np.float64)  # a copy, never a view of the mapped file
        if isinstance(self.base, ir.ExternalTensor):
            self.base.release()  # unmap: the pages read do not stay in this process's RSS (re-mapped on demand)
        if not np.isfinite(array).all():
            raise RotgraphError(
                f"initializer {self.base.name or self.name!r} has {int((~np.isfinite(array)).sum())} non-finite "
                "values (NaN or Inf); a rotation would spread them over every channel"
            )
        for step in self.steps:
            array = step(array)
        return array

    def __call__(self) -> ir.Tensor:
        return ir.Tensor(self.float64().astype(self.base.dtype.numpy()), name=self.name)


class ChainTensor(ir.LazyTensor):
    """A lazy tensor that remembers its chain, so later rewrites extend it instead of nesting."""

    def __init__(self, chain: _Chain, dtype: ir.DataType, shape: ir.Shape, name: str | None) -> None:
        super().__init__(chain, dtype=dtype, shape=shape, name=name)
        self.chain = chain


def _chain_of(tensor: ir.TensorProtocol) -> _Chain:
    if isinstance(tensor, ChainTensor):
        return tensor.chain
    return _Chain(tensor, (), tensor.name)


def scale_rows(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Step W [in, out] -> diag(s) W (bind `s` with functools.partial)."""
    return w * s[:, None]


def multiply_left(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Step W -> m @ W (bind `m` with functools.partial, never a late-binding closure)."""
    return m @ w


def multiply_right(w: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Step W -> W @ m."""
    return w @ m


def initializer_tensor(value: ir.Value) -> ir.TensorProtocol:
    if value.const_value is None:
        raise ValueError(f"value {value.name!r} has no constant tensor")
    return value.const_value


def read_float64(value: ir.Value) -> np.ndarray:
    """The current contents of an initializer (queued rewrites applied) in float64."""
    return _chain_of(initializer_tensor(value)).float64()


def rewrite_initializer(value: ir.Value, step: Step, shape: Sequence[int] | None = None) -> None:
    """Queue `step` (float64 array -> float64 array) on the initializer `value`.

    `shape` is the shape after the step when it changes; the dtype never changes.
    """
    tensor = initializer_tensor(value)
    chain = _chain_of(tensor)
    new = _Chain(chain.base, (*chain.steps, step), chain.name)
    value.const_value = ChainTensor(
        new, tensor.dtype, ir.Shape(shape if shape is not None else tensor.shape.numpy()), tensor.name
    )
    if shape is not None:
        value.shape = ir.Shape(shape)


def new_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register `tensor` as a new initializer of `graph` under a name not used yet."""
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def lazy_from(source: ir.Value, step: Step, shape: Sequence[int], name: str) -> ChainTensor:
    """A new lazy tensor computed from `source`'s current contents by `step` in float64."""
    chain = _chain_of(initializer_tensor(source))
    return ChainTensor(_Chain(chain.base, (*chain.steps, step), name), chain.base.dtype, ir.Shape(shape), name)


class SpillFile:
    """Moves in-memory initializers to a scratch file as a pass produces them, leaving external tensors
    that point into it, so the pass holds none of its outputs in memory; saving copies them file to
    file (`ExternalTensor.tofile`). The caller owns `directory` and removes it after the save."""

    MIN_BYTES = 1 << 16

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "spill.data"

    def spill(self, graph: ir.Graph, *, everything: bool = False, min_bytes: int | None = None) -> int:
        """Spill every in-memory initializer of at least `min_bytes` (default MIN_BYTES); returns the
        bytes written.

        With `everything`, lazy tensors (queued rewrites, computed here once) and every tensor mapped
        from another file are moved too, so the whole model then reads its external data from this one
        file."""
        written = 0
        with open(self.path, "ab") as f:
            offset = f.seek(0, os.SEEK_END)  # the file's end now: other SpillFiles may have appended to it
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or self.holds(tensor):
                    continue
                mapped = isinstance(tensor, ir.ExternalTensor)
                if not (everything and mapped) and tensor.nbytes < (min_bytes or self.MIN_BYTES):
                    continue  # small in-memory tensors stay inline (with `everything`, mapped ones all move)
                if type(tensor) is not ir.Tensor and not everything:
                    continue
                data = tensor.tobytes()
                f.write(data)
                value.const_value = ir.ExternalTensor(
                    self.path.name,
                    offset,
                    len(data),
                    tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=tensor.name or value.name or "",
                    base_dir=self.path.parent,
                )
                offset += len(data)
                written += len(data)
        return written

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        """Whether `tensor` already reads from this file."""
        return isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == self.path.resolve()
