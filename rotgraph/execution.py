"""Where rotgraph's independent work runs: in this process, or as tasks on a Ray cluster (`--ray`).

An `Execution` is a setting of how a command runs, never of what it computes: it is not recorded in a
recipe, and a run on Ray writes the same bytes as a run without it (tests on a local multi-node cluster).
Inside `running(execution)`, the code that has independent units of work (the weight rewrites that
`rotgraph.weights` queues, the weight quantizers of `QuantizeWeightsPass`) asks `current()` for the
runner and hands it tasks; without one it does the work itself, as before.

Data movement: a task is a module-level function and a payload that the runner pickles itself, so that
what travels through Ray's object store stays small. Arrays of `FILE_BYTES` or more (a learned rotation,
a GPTQ Hessian factor) are written once per run into the run's shared folder and memory-mapped by the
workers; initializers are passed as references to their external-data files, which every node must see
(`check_shared`), and a task writes its large results into that folder and returns their paths. The
folder is the output's staging folder, removed with it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from rotgraph.errors import RotgraphError

logger = logging.getLogger(__name__)

FILE_BYTES = 1 << 20  # arrays of a payload from this size on travel as files in the shared folder
RETRIES = 3  # times Ray runs a task again whose worker process died
# Every worker process computes on one thread (its numpy chunks, BLAS, onnxruntime): the cluster's
# parallelism is its worker processes.
WORKER_ENV = {"ROTGRAPH_WORKERS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Execution:
    """`ray`: run the independent tasks on Ray; `address`: the cluster's (None: a local Ray runtime of
    `workers` worker processes, default one per core)."""

    ray: bool = False
    address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise RotgraphError(f"--ray {self.workers}: a local runtime needs at least one worker process")
        if not self.ray and (self.address is not None or self.workers is not None):
            raise RotgraphError("worker processes and a cluster address need ray=True (--ray)")


_current: RayRunner | None = None


def current() -> RayRunner | None:
    """The runner of the command running now, or None (work runs in this process)."""
    return _current


@contextlib.contextmanager
def running(execution: Execution | None, folders: Sequence[Path] = ()) -> Iterator[RayRunner | None]:
    """Make `execution` the current one for the block (nothing changes without `ray`). `folders`: what
    every node must see (the input's folder; the staging folder is added by `shared`)."""
    global _current
    if execution is None or not execution.ray:
        yield None
        return
    if _current is not None:
        raise RotgraphError("a Ray run is already in progress in this process")
    runner = RayRunner(execution)
    _current = runner
    try:
        runner.check_shared(folders)
        yield runner
    finally:
        _current = None
        runner.close()


@contextlib.contextmanager
def shared(folder: Path) -> Iterator[Path]:
    """Use `folder` (inside the output's staging folder; created) for the current runner's files for the
    block, and delete the array files written there at its end; yields the folder."""
    runner = current()
    if runner is None:
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    runner.check_shared([folder])
    previous, files, runner.folder, runner._files = runner.folder, runner._files, folder, {}
    try:
        yield folder
    finally:
        runner.forget_files()  # this block's array files: its tasks are done
        runner.folder, runner._files = previous, files


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RotgraphError("--ray needs Ray: pip install 'rotgraph[ray]'") from None
    return ray


class RayRunner:
    """Runs tasks on a Ray cluster: `map` submits them, retries those whose worker died (`RETRIES`), shows
    one progress bar and reports a failed task in one line naming its unit of work."""

    def __init__(self, execution: Execution) -> None:
        ray = _ray()
        self.ray = ray
        self.folder: Path | None = None
        self._files: dict[int, tuple[weakref.ref[np.ndarray], str]] = {}  # id(array) -> (the array, its file)
        self._count = 0
        # What the run moved (bytes), logged at its end: payloads through Ray's object store, arrays the driver
        # wrote as files, and what the tasks read from the model's files and wrote as results.
        self.moved = {"tasks": 0, "payloads": 0, "arrays": 0, "read": 0, "written": 0}
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "error"}
            if execution.address is None:
                kwargs["num_cpus"] = execution.workers or os.cpu_count() or 1
            try:
                ray.init(address=execution.address, runtime_env={"env_vars": WORKER_ENV}, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = execution.address or "a local runtime"
                raise RotgraphError(f"--ray: cannot start or reach {where}: {e}") from None
        self.remote = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=1)(_run_task)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        logger.info("Ray: %d nodes, %d CPUs", len([n for n in ray.nodes() if n["Alive"]]), cpus)

    def cpus(self) -> int:
        """The cluster's CPUs now (its worker processes' slots)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def count(self, read: int = 0, written: int = 0) -> None:
        """Add to the bytes the tasks read from the model's files and wrote as results (`moved`)."""
        self.moved["read"] += read
        self.moved["written"] += written

    def close(self) -> None:
        m = self.moved
        logger.info(
            "Ray: %d tasks; %.1f MB of payloads through the object store; as files: %.1f MB of arrays from the "
            "driver, %.1f MB of weights read and %.1f MB of results written by the tasks",
            m["tasks"],
            m["payloads"] / 1e6,
            m["arrays"] / 1e6,
            m["read"] / 1e6,
            m["written"] / 1e6,
        )
        self.forget_files()
        if self.started:
            self.ray.shutdown()

    def forget_files(self) -> None:
        """Delete the array files written since the folder was set (its tasks are done)."""
        for _, path in self._files.values():
            Path(path).unlink(missing_ok=True)
        self._files.clear()

    def check_shared(self, folders: Sequence[Path]) -> None:
        """Refuse, in one line, a cluster on which a node does not see `folders` (each node runs a check)."""
        paths = [str(Path(f).resolve()) for f in folders]
        if not paths:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check = self.ray.remote(num_cpus=0)(_missing)
        nodes = [n for n in self.ray.nodes() if n["Alive"]]
        found = self.ray.get(
            [
                check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
                for n in nodes
            ]
        )
        for node, missing in zip(nodes, found, strict=True):
            if missing:
                raise RotgraphError(
                    f"--ray: node {node['NodeManagerAddress']} does not see {missing[0]}: every node needs the "
                    "input's and the output's folders at the same path (a shared file system)"
                )

    def pack(self, payload: object) -> bytes:
        """`payload` pickled, its large arrays written into the run's folder (once each) in their place."""
        buffer = io.BytesIO()
        _Packer(buffer, self).dump(payload)
        return buffer.getvalue()

    def array_file(self, array: np.ndarray) -> str:
        """The file holding `array` in the current folder, written on first use (an array is identified by
        the object: the caller must not change it while its tasks run)."""
        kept = self._files.get(id(array))
        if kept is not None and kept[0]() is array:
            return kept[1]
        if self.folder is None:
            raise RotgraphError("internal: a Ray task with a large array but no shared folder")
        self._count += 1
        path = self.folder / f"array-{self._count}.npy"
        np.save(path, np.ascontiguousarray(array))
        self.moved["arrays"] += array.nbytes
        self._files[id(array)] = (weakref.ref(array), str(path))
        return str(path)

    def submit(self, fn: Callable[..., Any], payload: Sequence[object], label: str) -> Task:
        """Start `fn(*payload)` on the cluster."""
        packed = self.pack(tuple(payload))
        self.moved["tasks"] += 1
        self.moved["payloads"] += len(packed)
        return Task(self.remote.remote(fn, packed), label)

    def gather(self, tasks: Sequence[Task], what: str) -> list[Any]:
        """The results of `tasks` in order, with one progress bar. A task that raises is reported as `what`
        and its label with the error's last line, and the others are cancelled."""
        index = {t.ref: i for i, t in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        pending = [t.ref for t in tasks]
        with tqdm(total=len(tasks), desc=what, unit="task", leave=False, disable=len(tasks) < 2) as bar:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    i = index[ref]
                    try:
                        results[i] = self.ray.get(ref)
                    except self.ray.exceptions.RayError as e:
                        for other in pending:
                            self.ray.cancel(other, force=True)
                        cause = getattr(e, "cause", None)
                        line = _last_line(cause) if isinstance(cause, BaseException) else _last_line(e)
                        raise RotgraphError(f"{what}: {tasks[i].label}: {line}") from None
                    bar.update(1)
        return results

    def map(
        self, fn: Callable[..., Any], payloads: Sequence[Sequence[object]], labels: Sequence[str], what: str
    ) -> list[Any]:
        """`fn(*payload)` for each payload on the cluster (`submit`, then `gather`)."""
        return self.gather([self.submit(fn, p, label) for p, label in zip(payloads, labels, strict=True)], what)


@dataclass(frozen=True)
class Task:
    ref: Any  # Ray's ObjectRef
    label: str  # the unit of work, for messages: "weight X", "block 3 down rows 0:1024"


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _run_task(fn: Callable[..., Any], payload: bytes) -> Any:
    """A Ray task: unpack the payload (mapping its array files) and call `fn`."""
    try:
        args = _Unpacker(io.BytesIO(payload)).load()
        return fn(*args)
    except RotgraphError:
        raise
    except Exception as e:  # the worker's traceback, for the log; the driver reports the last line
        logger.debug("task failed:\n%s", traceback.format_exc())
        raise RotgraphError(f"{type(e).__name__}: {e}") from e


class _Packer(pickle.Pickler):
    """Pickles large arrays as files (`RayRunner.array_file`) and external tensors as references."""

    def __init__(self, file: io.BytesIO, runner: RayRunner) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.runner = runner

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, np.ndarray) and obj.nbytes >= FILE_BYTES and obj.dtype != object:
            return ("array", self.runner.array_file(obj))
        if isinstance(obj, ir.ExternalTensor):
            return ("external", *external_reference(obj))
        if isinstance(obj, ir.Tensor):
            return ("tensor", np.asarray(obj.numpy()), int(obj.dtype), obj.name)
        return None


def external_reference(t: ir.ExternalTensor) -> tuple[str, int, int | None, int, tuple[int, ...], str | None]:
    """What rebuilds `t` in another process: (file, offset, length, dtype, shape, name)."""
    return (str(Path(t.path).resolve()), t.offset or 0, t.length, int(t.dtype), tuple(t.shape.numpy()), t.name)


def external_tensor(
    path: str, offset: int, length: int | None, dtype: int, shape: tuple[int, ...], name: str | None
) -> ir.ExternalTensor:
    p = Path(path)
    return ir.ExternalTensor(
        p.name, offset, length, ir.DataType(dtype), shape=ir.Shape(shape), name=name or "", base_dir=p.parent
    )


class _Unpacker(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> object:
        kind, *rest = pid
        if kind == "array":
            return np.load(rest[0], mmap_mode="r")
        if kind == "external":
            return external_tensor(*rest)
        if kind == "tensor":
            array, dtype, name = rest
            return ir.Tensor(array, dtype=ir.DataType(dtype), name=name)
        raise pickle.UnpicklingError(f"unknown reference {kind!r}")
