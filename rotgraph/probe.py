"""Run a model over token windows with chosen intermediate values as extra outputs.

The one mechanism behind every statistic rotgraph measures inside a model: calibration (X^T X for
GPTQ, per-channel maxima for SmoothQuant, clip ratios, means, static ranges, KV-cache scales) and
`inspect`'s outlier statistics. No copy of the model is saved for it: the graph (with the extra outputs)
is serialized in memory and onnxruntime reads the weights from the external-data file they already live
in. Weights that exist only in memory (lazy rewrites: rotated, smoothed, fused) are first written once
into a scratch file in a folder the caller owns (beside the output, inside its staging folder), and the
model is pointed at that file: every later probe, pass and the final save read them from there, so each
rotation is computed once.

A model whose weights are large runs block by block (`rotgraph.segments`): onnxruntime holds one
block's weights at a time and the residual stream between blocks for every window, so the memory a
probe needs does not grow with depth.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from rotgraph import execution
from rotgraph.errors import RotgraphError
from rotgraph.segments import Cut, SegmentModel, cuts, extract, segment_of
from rotgraph.weights import SpillFile

logger = logging.getLogger(__name__)

# In-memory initializer bytes that may be serialized inline with the graph; more are written to scratch.
INLINE_LIMIT = 64 << 20
# Tensors from this size on are materialized into scratch (smaller ones, such as the shape constants
# onnxruntime must read while it infers shapes, stay inline).
MATERIALIZE_BYTES = 1024


def _blockwise_bytes() -> int:
    value = os.environ.get("ROTGRAPH_BLOCKWISE_BYTES")
    try:
        return 2 << 30 if value is None else int(float(value))
    except ValueError:
        raise RotgraphError(f"ROTGRAPH_BLOCKWISE_BYTES={value!r} is not a number of bytes") from None


# Models whose weights take more than this are probed and validated block by block (`rotgraph.segments`);
# the environment variable ROTGRAPH_BLOCKWISE_BYTES sets it (a machine with little memory, the tests).
BLOCKWISE_BYTES = _blockwise_bytes()


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


def serialized(model: ir.Model, scratch: Path | None) -> tuple[onnx.ModelProto, Path | None]:
    """The model as a proto plus the folder its external data lies in. With `scratch`, weights held in
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
    return ir.serde.serialize_model(model), Path(next(iter(folders))) if folders else None


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (what onnxruntime holds to run it whole)."""
    return sum(t.nbytes for v in model.graph.initializers.values() if (t := v.const_value) is not None)


@dataclass(frozen=True)
class Probed:
    """`array`: the probed value number `value` (its index in the values asked for) on window `window`."""

    value: int
    window: int
    array: np.ndarray


def probe(
    model: ir.Model,
    values: Sequence[ir.Value],
    token_windows: np.ndarray,
    *,
    scratch: Path | None = None,
    optimization: str = "disable",
    what: str = "probe",
    progress: bool = False,
    blockwise: bool | None = None,
) -> Iterator[Probed]:
    """Each of `values` on each window of `token_windows` [n, seq], computed by onnxruntime.

    Every value comes on the windows in their order; how values interleave is not fixed (window by
    window when the model runs whole, block by block otherwise), so readers accumulate per value.
    `blockwise`: run the model one segment at a time (`rotgraph.segments`: one block's weights loaded
    at a time, the residual stream between blocks held for all windows); None does so when the weights
    take more than `BLOCKWISE_BYTES` and the graph can be cut (`segments.cuts`; one that cannot runs
    whole, with a warning). Both ways give the same arrays (a test). The model is left as it
    was; only its weights may have moved into `scratch` (see `materialize`)."""
    names = [v.name or "" for v in values]
    if any(not name for name in names) or len(set(names)) != len(set(map(id, values))):
        raise RotgraphError(f"probed values need distinct names, got {names}")
    found = None
    if blockwise or (blockwise is None and weight_bytes(model) > BLOCKWISE_BYTES):
        found = _cuts_or_none(model, what, loud=bool(blockwise))
    if found is None:
        yield from _whole(model, values, token_windows, scratch, optimization, what, progress)
    else:
        yield from _by_block(model, found, values, token_windows, scratch, optimization, what, progress)


def _cuts_or_none(model: ir.Model, what: str, loud: bool = False) -> list[Cut] | None:
    try:
        return cuts(model)
    except RotgraphError as e:
        if loud:
            raise
        logger.warning(
            "%s runs the whole model (%.1f GB of weights): it cannot be cut into blocks (%s)",
            what,
            weight_bytes(model) / 1e9,
            e,
        )
        return None


def runs_by_block(model: ir.Model, what: str = "calibration") -> bool:
    """Whether `probe` runs `model` block by block: its weights take more than `BLOCKWISE_BYTES` and it
    can be cut (`segments.cuts`; one that cannot is named in a warning)."""
    return weight_bytes(model) > BLOCKWISE_BYTES and _cuts_or_none(model, what) is not None


def _whole(
    model: ir.Model,
    values: Sequence[ir.Value],
    token_windows: np.ndarray,
    scratch: Path | None,
    optimization: str,
    what: str,
    progress: bool,
) -> Iterator[Probed]:
    from rotgraph.evaluate import make_session, model_feeds, owned

    added = [v for v in dict.fromkeys(values) if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        proto, folder = serialized(model, scratch)
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    names = [v.name or "" for v in values]
    session = make_session(proto.SerializeToString(), optimization, kernels=False, external_data_folder=folder)
    for w, window in enumerate(tqdm(token_windows, desc=what, unit="window", disable=not progress, leave=False)):
        for i, x in enumerate(session.run(names, model_feeds(session, window[None, :]))):
            yield Probed(i, w, owned(x))


def _by_block(
    model: ir.Model,
    cuts: list[Cut],
    values: Sequence[ir.Value],
    token_windows: np.ndarray,
    scratch: Path | None,
    optimization: str,
    what: str,
    progress: bool,
) -> Iterator[Probed]:
    """Segment by segment (`rotgraph.segments`), each over all windows, up to the last one asked for."""
    computed_in = segment_of(model.graph, cuts)
    where = [computed_in.get(id(v)) for v in values]
    if None in where:
        raise RotgraphError(
            f"probed values {[v.name for v, k in zip(values, where, strict=True) if k is None]} are not computed "
            "by the graph's nodes"
        )
    last = max(k for k in where if k is not None)
    runner = BlockRunner(model, cuts, window_feeds(model, token_windows), scratch, optimization)
    bar = tqdm(total=(last + 1) * len(token_windows), desc=what, unit="window", disable=not progress, leave=False)
    for k in range(last + 1):
        wanted = [i for i, seg in enumerate(where) if seg == k]
        for p in runner.run([values[i] for i in wanted], advance=k < last):
            yield Probed(wanted[p.value], p.window, p.array)
            bar.update(p.value == 0)
        if not wanted:
            bar.update(len(token_windows))
    bar.close()


def window_feeds(model: ir.Model, token_windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The whole model's feeds (`InputRoles.feeds`) for each window of `token_windows` [n, seq] as a batch of 1."""
    from rotgraph.inputs import input_roles

    roles = input_roles(model)
    return [roles.feeds(window[None, :]) for window in token_windows]


class BlockRunner:
    """Runs a model one segment at a time (`rotgraph.segments`: the embedding, each block, the head) on
    a list of runs (the whole model's feeds of each, `window_feeds` for token windows), holding the
    residual stream that enters the next segment for every run.

    Each `run` serializes the model as it is then, so a caller may change the segments not run yet, or
    the one it runs again (sequential GPTQ quantizes a block, then runs it quantized to feed the next).
    `cuts` are the boundaries (`segments.cuts`) found before any such change. With `frozen`, every run
    computes the model as it is now instead, whatever the caller changes later (GPTQ's Hessians on the
    float model, read as each block is quantized): its weights move into `scratch` now (`materialize`),
    and a copy of the graph without weight data is kept; values and cuts are matched to it by name.
    """

    def __init__(
        self,
        model: ir.Model,
        cuts: Sequence[Cut],
        feeds: Sequence[Mapping[str, np.ndarray]],
        scratch: Path | None,
        optimization: str = "basic",
        frozen: bool = False,
    ) -> None:
        self.model, self.cuts, self.feeds = model, list(cuts), feeds
        self.scratch, self.optimization = scratch, optimization
        self.segment = 0  # the next segment `run` runs
        self.residual: list[list[np.ndarray]] = []  # what enters it (the cut's values), per window
        self.entering: list[list[np.ndarray]] = []  # what entered the segment before it
        self._frozen: tuple[onnx.ModelProto, Path | None, dict[str, ir.Value]] | None = None
        if frozen:
            proto, folder = serialized(model, scratch)
            self.model = ir.serde.deserialize_model(proto)  # reads no weight data: only names and nodes
            self._frozen = proto, folder, _values_by_name(self.model.graph)
            self.cuts = [tuple(self._match(v) for v in cut) for cut in self.cuts]

    def _match(self, value: ir.Value) -> ir.Value:
        """`value` itself, or with `frozen` the value of the kept graph with its name."""
        if self._frozen is None:
            return value
        found = self._frozen[2].get(value.name or "")
        if found is None:
            raise RotgraphError(f"value {value.name!r} is not in the model as it was when the block runner started")
        return found

    def run(self, values: Sequence[ir.Value], advance: bool = True) -> Iterator[Probed]:
        """`values` (computed in the current segment) on every run (`Probed.window` is the run's index); with
        `advance`, the segment's output becomes the next segment's input once every run is done (so a
        partly consumed run advances nothing); without it the same segment runs again next time."""
        k = self.segment
        if advance and k >= len(self.cuts):
            raise RotgraphError("the head is the last segment: nothing follows it")
        cut_out = list(self.cuts[k]) if advance else []
        values = [self._match(v) for v in values]
        proto, folder = serialized(self.model, self.scratch) if self._frozen is None else self._frozen[:2]
        segment = extract(self.model, proto, k, self.cuts[k - 1] if k else (), [*cut_out, *values])
        del proto
        names = [v.name or "" for v in (*cut_out, *values)]
        following: list[list[np.ndarray]] = []
        runner = execution.current()
        if runner is not None and self.scratch is not None and len(self.feeds) > 1:
            outputs = self._outputs_on(runner, segment, names, folder)
        else:
            outputs = self._outputs(segment, names, folder)
        for w, outs in enumerate(outputs):
            if advance:
                following.append(outs[: len(cut_out)])
            for i, x in enumerate(outs[len(cut_out) :]):
                yield Probed(i, w, x)
        release_freed_memory()
        if advance:
            self.entering, self.residual, self.segment = self.residual, following, k + 1

    def _window_feeds(self, segment: SegmentModel, w: int) -> dict[str, np.ndarray]:
        feeds = {name: self.feeds[w][name] for name in segment.inputs}
        if segment.cut_in:
            feeds.update(zip(segment.cut_in, self.residual[w], strict=True))
        return feeds

    def _outputs(self, segment: SegmentModel, names: list[str], folder: Path | None) -> Iterator[list[np.ndarray]]:
        """`names` computed by `segment` on each run, in this process."""
        from rotgraph.evaluate import make_session, owned

        session = make_session(segment.model, self.optimization, kernels=False, external_data_folder=folder)
        for w in range(len(self.feeds)):
            yield [owned(x) for x in session.run(names, self._window_feeds(segment, w))]

    def _outputs_on(
        self, runner: execution.RayRunner, segment: SegmentModel, names: list[str], folder: Path | None
    ) -> Iterator[list[np.ndarray]]:
        """`_outputs` on a Ray cluster, the runs split into one contiguous shard per CPU (`run_segment`): each
        worker loads the segment once (its weights from their files) and writes its outputs into the
        staging folder; they are read back here in the runs' order."""
        assert self.scratch is not None
        runs = len(self.feeds)
        shards = max(1, min(runs, runner.cpus()))
        bounds = [round(i * runs / shards) for i in range(shards + 1)]
        model: bytes | np.ndarray = segment.model
        if len(segment.model) >= execution.FILE_BYTES:  # a graph with weights inline: as a file
            model = np.frombuffer(segment.model, dtype=np.uint8)
        with execution.shared(self.scratch / f"segment-{segment.index}") as shared:
            tasks = [
                runner.submit(
                    run_segment,
                    (
                        model,
                        None if folder is None else str(folder),
                        self.optimization,
                        [self._window_feeds(segment, w) for w in range(a, b)],
                        names,
                        str(shared / f"run-{a}"),
                    ),
                    f"segment {segment.index} runs {a}:{b}",
                )
                for a, b in itertools.pairwise(bounds)
                if b > a
            ]
            for paths in itertools.chain.from_iterable(runner.gather(tasks, f"segment {segment.index}")):
                outs = [np.load(p) for p in paths]
                for p in paths:
                    os.unlink(p)
                yield outs

    def replay(
        self, model: ir.Model, cuts: Sequence[Cut], feeds: Sequence[Mapping[str, np.ndarray]]
    ) -> list[list[np.ndarray]]:
        """What `model` (cut at `cuts`, the same boundaries: another state of the graph, e.g. with the block
        quantized since) computes for the segment this runner last advanced past, on the inputs that segment
        had in the first runs (`feeds`: `model`'s own feeds of them, whose inputs may differ): its outputs
        (the cut's values) per run, to compare with `residual`."""
        if self.segment < 2:
            raise RotgraphError("replay needs a block: the runner has not advanced past one")
        other = BlockRunner(model, cuts, feeds, self.scratch, self.optimization)
        other.segment, other.residual = self.segment - 1, self.entering[: len(feeds)]
        for _ in other.run([], advance=True):
            pass
        return other.residual


def run_segment(
    model: bytes | np.ndarray,
    folder: str | None,
    optimization: str,
    feeds: list[dict[str, np.ndarray]],
    names: list[str],
    prefix: str,
) -> list[list[str]]:
    """A Ray task: the segment `model` (its external data in `folder`) on each of `feeds`, on one thread;
    each output written as `prefix`-RUN-OUTPUT.npy (under another name, then renamed). Returns the paths per
    run."""
    from rotgraph.evaluate import make_session

    data = model if isinstance(model, bytes) else np.asarray(model).tobytes()
    where = None if folder is None else Path(folder)
    session = make_session(data, optimization, threads=1, kernels=False, external_data_folder=where)
    paths = []
    for i, feed in enumerate(feeds):
        run = []
        for j, x in enumerate(session.run(names, {k: np.asarray(v) for k, v in feed.items()})):
            path = f"{prefix}-{i}-{j}.npy"
            part = f"{path}.{os.getpid()}.part"
            with open(part, "wb") as f:
                np.save(f, x)
            os.replace(part, path)
            run.append(path)
        paths.append(run)
    return paths


def release_freed_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`; nothing elsewhere). A
    session's memory freed by onnxruntime stays in the allocator's per-thread arenas, fragmented, so without
    this the process grew by every block's session (tens of MB a block at 8B widths)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl has no malloc_trim)
    except (OSError, AttributeError):
        return None
    return libc


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
    return {v.name: v for v in values if v.name}


def streamed_logits(
    path: Path, feeds: Sequence[Mapping[str, np.ndarray]], optimization: str = "disable"
) -> list[np.ndarray]:
    """The first output (the logits) of the model file `path` on each run of `feeds` (the whole model's
    feeds), computed segment by segment: onnxruntime holds one block's weights at a time. A graph that
    can be cut only in its canonical form (an exporter's decomposed norms) is canonicalized in memory
    first (the same function to float32 rounding)."""
    from rotgraph import io
    from rotgraph.pipeline import canonicalize

    model = io.load_model(path)
    logits = model.graph.outputs[0]
    try:
        found = cuts(model)
    except RotgraphError:
        canonicalize(model)
        found = cuts(model)
    runner = BlockRunner(model, found, feeds, None, optimization)
    while runner.segment < len(found):
        for _ in runner.run([], advance=True):
            pass
    return [p.array for p in runner.run([logits], advance=False)]
