"""Lazy float64 rewrites of initializers.

Passes never materialize rewritten weights. `rewrite_initializer` replaces an initializer's tensor by
an `ir.LazyTensor` that, when the model is saved, reads the original (memory-mapped) tensor once,
converts it to float64, applies every queued step in order and casts back to the original dtype once
(chunk by chunk where the steps allow it).
Several passes rewriting the same weight therefore cost one float32 rounding, and the pipeline holds
no second copy of the weights in memory.

A step function may declare how it acts on a 2-D weight (`row_wise`: the same map on every row, as
W -> W M; `column_wise`: on every column, as W -> M W; `transposing`). A chain whose steps all act on
rows (or all on columns, a transpose swapping the two) is evaluated over chunks of the base tensor of
at most CHUNK_BYTES in float64, each cast into the output as it is done, so such a weight (the
embedding, every R1 reader) is never whole in float64: a 128256 x 8192 embedding would take 8.4 GB. A
chain that mixes the two (down_proj: R1 on the right, R4 on the left) holds its weight once in float64
and applies each declared step to it in place, chunk by chunk; an undeclared step gets the whole
float64 array, as before.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.hadamard import HadamardRotation, Matrix
from rotgraph.threads import one_blas_thread_each, workers

Step = Callable[[np.ndarray], np.ndarray]
F = TypeVar("F", bound=Callable[..., Any])

CHUNK_BYTES = 64 << 20  # float64 bytes of the base tensor per chunk
ROWS, COLUMNS, TRANSPOSE = "rows", "columns", "transpose"
_ACTS: dict[Callable[..., Any], str] = {}


def row_wise(fn: F) -> F:
    """Declare a step function that maps every row of a 2-D array on its own and alike: f(W)[r] = f(W[r])
    for any rows r (W -> W M, a per-column scale, a column range). It may change the number of columns."""
    _ACTS[fn] = ROWS
    return fn


def column_wise(fn: F) -> F:
    """Declare a step function with f(W)[:, c] = f(W[:, c]) for any columns c (W -> M W, a per-row scale)."""
    _ACTS[fn] = COLUMNS
    return fn


def transposing(fn: F) -> F:
    """Declare a step function that is W -> W^T."""
    _ACTS[fn] = TRANSPOSE
    return fn


def acts_on(step: Step) -> str | None:
    """How a step acts on a 2-D array (ROWS, COLUMNS, TRANSPOSE), or None when it does not say."""
    return _ACTS.get(getattr(step, "func", step))  # a functools.partial names its function


def _slab(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(start, stop),) if axis == 0 else (slice(None), slice(start, stop))


class _Chain:
    """Callable for `ir.LazyTensor`: base tensor -> float64 -> steps -> original dtype."""

    def __init__(self, base: ir.TensorProtocol, steps: tuple[Step, ...], name: str | None) -> None:
        self.base = base
        self.steps = steps
        self.name = name

    def _streaming_axis(self) -> tuple[int, int] | None:
        """(axis of the base, axis of the result) along which every step maps chunks independently."""
        if len(self.base.shape) != 2:
            return None
        for first in (0, 1):
            axis = first
            for step in self.steps:
                acts = acts_on(step)
                if acts == TRANSPOSE:
                    axis = 1 - axis
                elif acts != (ROWS if axis == 0 else COLUMNS):
                    break
            else:
                return first, axis
        return None

    def _size(self, axis: int, chunk_bytes: int) -> tuple[int, int]:
        """(length along `axis`, chunk size along it): `chunk_bytes` of float64 per chunk."""
        shape = tuple(self.base.shape.numpy())
        length = shape[axis] if len(shape) == 2 else 1
        return length, max(1, chunk_bytes // (8 * max(int(np.prod(shape)) // max(length, 1), 1)))

    def _chunks(self, axis: int, chunk_bytes: int, *, check: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, float64 copy) of the base in chunks along `axis` (a tensor not 2-D: one chunk)."""
        length, size = self._size(axis, chunk_bytes)
        with _Reader(self.base) as reader:
            for start in range(0, max(length, 1), size):
                stop = min(start + size, length)
                yield start, stop, self._read(reader, axis, start, stop, chunk_bytes, check)

    def _read(self, reader: _Reader, axis: int, start: int, stop: int, chunk_bytes: int, check: bool) -> np.ndarray:
        """The base's chunk start:stop along `axis` in float64, refused (with a count over the whole tensor)
        when `check` and it holds a value that is not finite."""
        x, nonfinite = reader.read(axis, start, stop)
        if check and nonfinite:
            count = sum(int((~np.isfinite(c)).sum()) for _, _, c in self._chunks(axis, chunk_bytes, check=False))
            raise RotgraphError(
                f"initializer {self.base.name or self.name!r} has {count} non-finite values (NaN or Inf); a "
                "rotation would spread them over every channel"
            )
        return x

    def evaluate(self, dtype: np.dtype | type, chunk_bytes: int | None = None) -> np.ndarray:
        """The rewritten tensor, computed in float64 and cast to `dtype` (chunk by chunk where the steps
        allow it)."""
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        streaming, shape = self._streaming_axis(), tuple(self.base.shape.numpy())
        if streaming is not None and shape[streaming[0]] > 0:
            return self._stream(*streaming, dtype, chunk_bytes)
        array, owned = self._read_whole(chunk_bytes), True
        for step in self.steps:
            array, owned = _apply(step, array, chunk_bytes, in_place=owned)
        if np.dtype(dtype) == np.float16 and array.ndim == 2 and array.dtype == np.float64:
            out = np.empty(array.shape, dtype=np.float16)
            _cast_into(out, array)
            return out
        return array.astype(dtype, copy=False)

    def _stream(self, first: int, last: int, dtype: np.dtype | type, chunk_bytes: int) -> np.ndarray:
        """The chain over chunks of the base along `first` (the result's axis `last`), each cast into the
        output as it is done, `threads.workers()` chunks at once in worker threads (numpy, BLAS, the
        compiled functions and file reads release the GIL). A chunk is read in its worker where the reader
        allows it (`_Reader.concurrent`), else here while the workers transform the ones before."""
        out: np.ndarray | None = None
        length, size = self._size(first, chunk_bytes)

        def finish(start: int, stop: int, x: np.ndarray | None) -> None:
            nonlocal out
            if x is None:
                x = self._read(reader, first, start, stop, chunk_bytes, True)
            for step in self.steps:
                x = step(x)
            if out is None:  # the first chunk (run here, before any worker): it gives the result's shape
                result = list(x.shape)
                result[last] = tuple(self.base.shape.numpy())[first]
                out = np.empty(result, dtype=dtype)
            _cast_into(out[_slab(last, start, stop)], x)  # the same rounding as astype

        pending: deque[Future[None]] = deque()
        threads = workers()
        with (
            _Reader(self.base) as reader,
            ThreadPoolExecutor(max_workers=threads) as pool,
            one_blas_thread_each(threads),
        ):
            for start in range(0, length, size):
                stop = min(start + size, length)
                x = None if reader.concurrent else self._read(reader, first, start, stop, chunk_bytes, True)
                if out is None:
                    finish(start, stop, x)
                    continue
                if len(pending) >= (2 * threads if reader.concurrent else threads):
                    pending.popleft().result()
                pending.append(pool.submit(finish, start, stop, x))
                del x
            while pending:
                pending.popleft().result()
        assert out is not None
        return out

    def _read_whole(self, chunk_bytes: int) -> np.ndarray:
        shape = tuple(self.base.shape.numpy())
        if len(shape) != 2:
            return next(self._chunks(0, chunk_bytes))[2]
        array = np.empty(shape, dtype=np.float64)
        for start, stop, x in self._chunks(0, chunk_bytes):
            array[start:stop] = x
        return array

    def float64(self) -> np.ndarray:
        return self.evaluate(np.float64)

    def __call__(self) -> ir.Tensor:
        return ir.Tensor(self.evaluate(self.base.dtype.numpy()), name=self.name)


def _raw_layout(tensor: ir.ExternalTensor) -> bool:
    """Whether the tensor's bytes in its file are its numpy array's (one byte or more per value, this
    machine's byte order: ONNX stores little-endian)."""
    return sys.byteorder == "little" and tensor.dtype.bitwidth >= 8


class _Reader:
    """Chunks of a tensor as float64 copies, with how many of their values are not finite (a context
    manager).

    An external tensor stored as its array's bytes (`_raw_layout`) is read from its file with positional
    reads, safe from several threads at once (`concurrent`): a chunk of rows in one read, a chunk of columns
    in one read per row. Through a memory map, a chunk of columns faulted once per row and was unmapped
    after it (7 ns per value against 2.3 read row by row, measured at 8B widths), and the faults ran in one
    thread. The tensor's bytes are announced to the kernel first (POSIX_FADV_WILLNEED), so that a model not
    in the page cache is read ahead in order. Any other tensor is read through `numpy()` (from several
    threads only when it is an array in memory), a mapped one unmapped after each chunk so that its pages
    do not stay in this process's RSS.
    float16 is converted by rotgraph's compiled function where it is built (`_half_to_double`).
    """

    def __init__(self, tensor: ir.TensorProtocol) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape.numpy())
        self.convert = _half_to_double() if tensor.dtype == ir.DataType.FLOAT16 and len(self.shape) == 2 else None
        self.fd: int | None = None
        if isinstance(tensor, ir.ExternalTensor) and len(self.shape) == 2 and _raw_layout(tensor):
            self.fd = os.open(tensor.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, tensor.offset or 0, tensor.nbytes, os.POSIX_FADV_WILLNEED)
        self.concurrent = self.fd is not None or isinstance(tensor, ir.Tensor)  # a file, or an array in memory

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def read(self, axis: int, start: int, stop: int) -> tuple[np.ndarray, int]:
        array = None
        if self.fd is not None:
            part = self._read_file(axis, start, stop)
        else:
            array = self.tensor.numpy()
            part = array[_slab(axis, start, stop)] if len(self.shape) == 2 else array
        if self.convert is not None:
            x, nonfinite = self.convert(part)
        else:
            x = np.array(part, dtype=np.float64)
            nonfinite = int(x.size - np.count_nonzero(np.isfinite(x)))
        del array, part  # x is a copy, never a view of a mapped file
        if isinstance(self.tensor, ir.ExternalTensor) and self.fd is None:
            self.tensor.release()
        return x, nonfinite

    def _read_file(self, axis: int, start: int, stop: int) -> np.ndarray:
        assert self.fd is not None and isinstance(self.tensor, ir.ExternalTensor)
        rows, columns = self.shape
        dtype = self.tensor.dtype.numpy()
        out = np.empty((stop - start, columns) if axis == 0 else (rows, stop - start), dtype=dtype)
        size, origin, raw = out.itemsize, self.tensor.offset or 0, out.view(np.uint8)  # bfloat16 has no buffer
        if axis == 0:
            reads = [(raw.reshape(-1), origin + start * columns * size)]
        else:
            reads = [(raw[r], origin + (r * columns + start) * size) for r in range(rows)]
        for buffer, offset in reads:
            if os.preadv(self.fd, [buffer.data], offset) != buffer.nbytes:
                raise RotgraphError(f"initializer {self.tensor.name!r}: {self.tensor.path} ends before its data")
        return out


def _half_to_double() -> Callable[[np.ndarray], tuple[np.ndarray, int]] | None:
    """rotgraph's compiled float16 -> float64 conversion (with its count of non-finite values), or None."""
    from rotgraph.kernels import weight_functions

    functions = weight_functions()
    return None if functions is None else functions.half_to_double


def _cast_into(out: np.ndarray, x: np.ndarray) -> None:
    """out[...] = x (float64 into out's dtype, rounded as numpy's astype): float16 rows by rotgraph's
    compiled conversion where it is built (numpy converts float16 one value at a time)."""
    from rotgraph.kernels import weight_functions

    functions = weight_functions()
    rows = out.ndim == 2 and (out.shape[1] < 2 or out.strides[1] == out.itemsize)
    if functions is not None and functions.double_to_half is not None and out.dtype == np.float16 and rows:
        if x.dtype != np.float64 or x.shape != out.shape or (x.shape[1] > 1 and x.strides[1] != 8):
            x = np.ascontiguousarray(x, dtype=np.float64).reshape(out.shape)
        functions.double_to_half(x, out)
        return
    out[...] = x


def _apply(step: Step, array: np.ndarray, chunk_bytes: int, *, in_place: bool) -> tuple[np.ndarray, bool]:
    """One step on a whole float64 array, and whether the result is this evaluation's own array. A
    declared row- or column-wise step runs chunk by chunk on `threads.workers()` threads (the first chunk
    here: it gives the result's shape), in place when `array` is ours and the step keeps its shape; any
    other step gets the whole array (and may return an array it shares)."""
    acts = acts_on(step)
    if array.ndim != 2 or acts not in (ROWS, COLUMNS) or array.size == 0:
        return step(array), False
    axis = 0 if acts == ROWS else 1
    size = max(1, chunk_bytes // (8 * max(array.shape[1 - axis], 1)))
    slabs = [_slab(axis, start, start + size) for start in range(0, array.shape[axis], size)]
    y = step(array[slabs[0]])
    shape = list(y.shape)
    shape[axis] = array.shape[axis]
    out = array if in_place and tuple(shape) == array.shape else np.empty(shape, dtype=np.float64)

    def finish(where: tuple[slice, ...]) -> None:  # disjoint slabs: read, then written, by one thread
        out[where] = step(array[where])

    out[slabs[0]] = y
    threads = workers()
    with ThreadPoolExecutor(max_workers=threads) as pool, one_blas_thread_each(threads):
        list(pool.map(finish, slabs[1:]))
    return out, True


class ChainTensor(ir.LazyTensor):
    """A lazy tensor that remembers its chain, so later rewrites extend it instead of nesting."""

    def __init__(self, chain: _Chain, dtype: ir.DataType, shape: ir.Shape, name: str | None) -> None:
        super().__init__(chain, dtype=dtype, shape=shape, name=name)
        self.chain = chain


def _chain_of(tensor: ir.TensorProtocol) -> _Chain:
    if isinstance(tensor, ChainTensor):
        return tensor.chain
    return _Chain(tensor, (), tensor.name)


@column_wise
def scale_rows(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Step W [in, out] -> diag(s) W (bind `s` with functools.partial)."""
    return w * s[:, None]


@column_wise
def multiply_left(w: np.ndarray, m: Matrix) -> np.ndarray:
    """Step W -> m @ W (bind `m` with functools.partial, never a late-binding closure); a factored m
    (`HadamardRotation`) runs as a fast transform of each column."""
    if isinstance(m, HadamardRotation):
        return m.T.apply(w, axis=0)  # column v -> m v = (v^T m^T)^T
    return m @ w


@row_wise
def multiply_right(w: np.ndarray, m: Matrix) -> np.ndarray:
    """Step W -> W @ m (a factored m: a fast transform of each row)."""
    if isinstance(m, HadamardRotation):
        return m.apply(w, axis=-1)
    return w @ m


def initializer_tensor(value: ir.Value) -> ir.TensorProtocol:
    if value.const_value is None:
        raise ValueError(f"value {value.name!r} has no constant tensor")
    return value.const_value


def read_float64(value: ir.Value) -> np.ndarray:
    """The current contents of an initializer (queued rewrites applied) in float64."""
    return _chain_of(initializer_tensor(value)).float64()


def source(value: ir.Value) -> _Chain:
    """The initializer's base tensor and queued rewrites, as a picklable object (a Ray task's payload:
    `rotgraph.execution` passes an external base tensor as a reference to its file)."""
    return _chain_of(initializer_tensor(value))


def output_columns(chain: _Chain, start: int, stop: int) -> np.ndarray:
    """Columns start:stop of a 2-D initializer's current contents, transposed: rows [stop - start, in] of
    W^T (float64), the same numbers as `read_float64(value).T[start:stop]`."""
    return _part(chain, 1, start, stop).T


def stored_rows(chain: _Chain, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a 2-D initializer's current contents (float64), as `read_float64(value)[start:stop]`."""
    return _part(chain, 0, start, stop)


def _part(chain: _Chain, axis: int, start: int, stop: int) -> np.ndarray:
    """start:stop along `axis` of the chain's result in float64. Where the steps map slabs of the base along
    an axis to slabs of the result along `axis` (`_Chain._streaming_axis`), only that slab of the base is read
    and rewritten (the numbers `_Chain.evaluate` gives, which computes the same slabs chunk by chunk); else
    the whole chain is evaluated. A non-finite value is refused as `read_float64` refuses it."""
    streaming = chain._streaming_axis()
    if streaming is None or streaming[1] != axis:
        return chain.float64()[_slab(axis, start, stop)]
    with _Reader(chain.base) as reader:
        x = chain._read(reader, streaming[0], start, stop, CHUNK_BYTES, True)
    for step in chain.steps:
        x = step(x)
    return x


def read_stored(value: ir.Value) -> np.ndarray:
    """The initializer's values as stored (memory-mapped from its file, in its own dtype) when no rewrite is
    queued on it, else `read_float64`: the same numbers either way, for readers that convert a chunk at a time."""
    tensor = initializer_tensor(value)
    return tensor.numpy() if isinstance(tensor, ir.ExternalTensor) else read_float64(value)


def release_stored(value: ir.Value) -> None:
    """Unmap the initializer's file after `read_stored` (its pages leave this process's RSS; a later read maps
    it again)."""
    tensor = initializer_tensor(value)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


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


_files = itertools.count()
GROUP_BYTES = 64 << 20  # on a Ray run, smaller rewritten initializers go to the workers in groups of about this size


def evaluate_remotely(graph: ir.Graph, folder: Path) -> int:
    """With a Ray run in progress (`rotgraph.execution.current`), compute every initializer's queued
    rewrites as tasks: one per initializer of GROUP_BYTES or more, one per group of smaller ones (in graph
    order). Each worker reads the base tensors from their files, runs each chain as `_Chain.evaluate` does
    here (the same bytes) and writes the results into one file of `folder`, which the initializers then
    read (external tensors). Returns the bytes written; without a run, nothing happens (the rewrites stay
    queued)."""
    from rotgraph import execution

    runner = execution.current()
    lazy = [v for v in graph.initializers.values() if isinstance(v.const_value, ChainTensor)]
    if runner is None or not lazy:
        return 0
    groups: list[list[ir.Value]] = []
    size = GROUP_BYTES
    for value in lazy:
        nbytes = value.const_value.nbytes  # type: ignore[union-attr]
        if nbytes >= GROUP_BYTES or size + nbytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(value)
        size += nbytes
    with execution.shared(folder):
        paths = [folder / f"weights-{next(_files)}.bin" for _ in groups]  # never a file an earlier call wrote
        payloads = [
            ([v.const_value.chain for v in group], str(p))  # type: ignore[union-attr]
            for group, p in zip(groups, paths, strict=True)
        ]
        labels = [f"weight {g[0].name}" + (f" and {len(g) - 1} more" if len(g) > 1 else "") for g in groups]
        sizes = runner.map(_evaluate_into, payloads, labels, "weights")
    runner.count(read=sum(v.const_value.chain.base.nbytes for v in lazy), written=sum(map(sum, sizes)))  # type: ignore[union-attr]
    for group, path, group_sizes in zip(groups, paths, sizes, strict=True):
        offset = 0
        for value, nbytes in zip(group, group_sizes, strict=True):
            tensor = value.const_value
            assert tensor is not None
            shape = ir.Shape(tensor.shape.numpy())
            name = tensor.name or ""
            value.const_value = ir.ExternalTensor(
                path.name, offset, nbytes, tensor.dtype, shape=shape, name=name, base_dir=folder
            )
            offset += nbytes
    return sum(sum(s) for s in sizes)


def _evaluate_into(chains: list[_Chain], path: str) -> list[int]:
    """A task: each of `chains` evaluated, written one after the other into the file `path` (under another
    name, then renamed, so that a task run again after its worker died never leaves a partial file); returns
    their bytes."""
    sizes = []
    part = f"{path}.{os.getpid()}.part"
    with open(part, "wb") as f:
        for chain in chains:
            array = chain.evaluate(chain.base.dtype.numpy())
            np.ascontiguousarray(array).view(np.uint8).tofile(f)
            sizes.append(int(array.nbytes))
            del array
    os.replace(part, path)
    return sizes


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
        written = evaluate_remotely(graph, self.path.parent) if everything else 0
        # Not opened for appending: onnx_ir copies an external tensor with copy_file_range, which refuses that.
        with open(self.path, "r+b" if self.path.exists() else "wb") as f:
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
                # onnx_ir's tensors write from their array, or file to file: never a bytes copy of a 1 GB table
                tofile = getattr(tensor, "tofile", None)
                if tofile is not None:
                    tofile(f)
                else:
                    f.write(tensor.tobytes())
                size = f.tell() - offset
                if isinstance(tensor, ir.ExternalTensor):
                    tensor.release()  # unmap: a copied model's pages do not stay in this process's RSS
                value.const_value = ir.ExternalTensor(
                    self.path.name,
                    offset,
                    size,
                    tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=tensor.name or value.name or "",
                    base_dir=self.path.parent,
                )
                offset += size
                written += size
        return written

    def holds(self, tensor: ir.TensorProtocol) -> bool:
        """Whether `tensor` already reads from this file's folder (this file, or a file that
        `evaluate_remotely` wrote there)."""
        return (
            isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve().parent == self.path.parent.resolve()
        )
