"""Loading models lazily and writing outputs atomically."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir

from rotgraph.errors import RotgraphError

TOKENIZER_FILE = "tokenizer.json"
logger = logging.getLogger(__name__)


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX model; external data stays memory-mapped until a tensor is read."""
    p = Path(path)
    if not p.is_file():
        raise RotgraphError(f"{p}: no such model file")
    try:
        model = ir.load(p)
    except Exception as e:  # onnx raises DecodeError, RuntimeError, ... for corrupt files
        raise RotgraphError(f"{p}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if len(model.graph) == 0 or not model.graph.outputs:
        missing = "no nodes" if len(model.graph) == 0 else "no outputs"
        raise RotgraphError(f"{p}: the graph has {missing}: not a language model (input_ids -> logits)")
    _check_external_data(p, model)
    return model


# Run by `check_loads` in a child process: what rotgraph does first with an input model that can crash
# the process (C++ code reading a malformed graph). It prints each stage before it; errors are ignored
# here (the parent reports them with their context), only a crash counts.
_LOAD_CHECK = """
import sys
import numpy as np
path, limit, stages = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
weights = 0
try:
    print("onnx's shape inference", flush=True)
    import onnx
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        weights += int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
except Exception:
    pass
if "onnxruntime" in stages and weights <= limit:
    print("onnxruntime", flush=True)
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception:
        pass
"""


def check_loads(path: Path, onnxruntime: bool = True) -> None:
    """Read the model at `path` first in a child process, as rotgraph will: onnx's shape inference on the
    graph (no weights loaded) and, with `onnxruntime`, an onnxruntime session (which loads the weights once
    more; not for a model whose weights rotgraph runs block by block, `probe.BLOCKWISE_BYTES`, which no
    session loads whole). Some malformed graphs crash these (a GatherND with batch_dims -999 segfaults
    both): that becomes a RotgraphError instead of a dead process. Anything short of a crash is left to the
    real load."""
    from rotgraph.probe import BLOCKWISE_BYTES

    stages = ["onnxruntime"] if onnxruntime else []
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_CHECK, str(path), str(BLOCKWISE_BYTES), *stages],
        capture_output=True,
        text=True,
    )
    if done.returncode >= 0:
        return
    stage = (done.stdout.strip().splitlines() or ["onnx"])[-1]
    try:
        how = signal.Signals(-done.returncode).name
    except ValueError:
        how = f"signal {-done.returncode}"
    raise RotgraphError(
        f"{path}: {stage} crashed ({how}) reading this model: the graph is malformed, rotgraph does not load it"
    )


def _check_external_data(path: Path, model: ir.Model) -> None:
    """Every external-data tensor's file exists and holds its bytes (else reading it later would fail
    deep inside a pass)."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        file = tensor.path
        if file not in sizes:
            if not os.path.isfile(file):
                raise RotgraphError(f"{path}: external data file {file} is missing (initializer {value.name!r})")
            sizes[file] = os.path.getsize(file)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[file]:
            raise RotgraphError(
                f"{path}: external data file {file} is truncated ({sizes[file]} bytes; initializer "
                f"{value.name!r} needs bytes up to {end})"
            )


def external_data_files(model_path: Path) -> set[Path]:
    """The external-data files a saved model refers to (without loading tensors)."""
    import onnx

    try:
        proto = onnx.load(model_path, load_external_data=False)
    except Exception:  # unreadable: `load_model` reports it
        return set()
    files = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add((model_path.parent / entry.value).resolve())
    return files


def check_output_path(inputs: list[Path], output: Path) -> None:
    """Refuse an output that would overwrite an input model or the external data it reads."""
    out = output.resolve()
    data = out.with_name(out.name + ".data")
    for source in inputs:
        src = source.resolve()
        if out == src:
            raise RotgraphError(f"output {output} is the input model: rotgraph never overwrites its input")
        if src.suffix == ".onnx" and src.is_file() and data in external_data_files(src):
            raise RotgraphError(f"output data file {data} is read by the input {source}")
    if output.suffix != ".onnx":
        raise RotgraphError(f"output {output} must end in .onnx")


# In a staging folder: "HOST PID" of the run writing there, so that a later run can tell a folder that a
# killed run left behind (its process is gone) from one that a running process still writes.
STAGE_OWNER = ".rotgraph-owner"


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a path in a private folder beside `output`; on success move what was written there into
    place (external data first, the .onnx last), on failure remove it all. Nothing half-written remains;
    the folders a killed run left for the same output are removed first (`remove_stale_stages`)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(output)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        (stage / STAGE_OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        yield stage / output.name
        files = sorted((f for f in stage.iterdir() if f.name != STAGE_OWNER), key=lambda f: f.name == output.name)
        for f in files:
            os.replace(f, output.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_stages(output: Path) -> list[Path]:
    """Remove the staging folders of `output` (`.NAME.*` beside it) whose owner file names a process on
    this host that no longer runs; folders without one (not rotgraph's, or from an older version), of
    other hosts or of live processes are left alone. Returns the folders removed."""
    if os.name != "posix":  # os.kill(pid, 0) only probes a process on POSIX
        return []
    removed = []
    for stage in output.parent.glob(f".{glob.escape(output.name)}.*"):
        try:
            host, pid = (stage / STAGE_OWNER).read_text(encoding="utf-8").split()
            if not stage.is_dir() or host != socket.gethostname() or _running(int(pid)):
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(stage, ignore_errors=True)
        logger.info("removed %s, left by an interrupted run (process %s)", stage, pid)
        removed.append(stage)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs as another user
        return True
    return True


SAVE_IN_FLIGHT_BYTES = 512 << 20  # tensors computed but not yet written, besides the largest one


def save_model(
    model: ir.Model,
    path: Path,
    callback: Callable[[ir.TensorProtocol, ir.external_data.CallbackInfo], None] | None = None,
) -> None:
    """Save with weights as external data `<name>.data` beside the model (call inside `staged_output`);
    `callback` is called before each external tensor is written (a progress bar). On a Ray run the queued
    weight rewrites are computed by the cluster's workers first (`weights.evaluate_remotely`, into a folder
    beside `path` that is removed after the save). `threads.workers()`
    tensors are computed and written at once (onnx_ir's parallel writer: a lazy weight's rewrite overlaps
    the writing of the one before), at most SAVE_IN_FLIGHT_BYTES of them (and the largest) in memory."""
    from rotgraph.threads import workers
    from rotgraph.weights import evaluate_remotely

    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.2x-1.3x reads IR versions up to 10/11
    shards = path.parent / f".{path.name}.shards"
    try:
        evaluate_remotely(model.graph, shards)  # on a Ray run: queued rewrites computed by the workers
        ir.save(
            model,
            path,
            external_data=path.name + ".data",
            callback=callback,
            max_workers=workers(),
            max_in_flight_bytes=SAVE_IN_FLIGHT_BYTES,
        )
    finally:
        shutil.rmtree(shards, ignore_errors=True)


def require_files(paths: list[Path]) -> None:
    for p in paths:
        if not p.is_file():
            raise RotgraphError(f"{p}: no such model file")


def find_tokenizer(model_path: Path, explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The tokenizer file given, or `tokenizer.json` beside the model."""
    if explicit is not None:
        p = Path(explicit)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise RotgraphError(f"tokenizer {explicit}: no such file")
        return p
    candidate = model_path.parent / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


GENAI_CONFIG = "genai_config.json"


def copy_companions(source_model: Path, staged_model: Path, output: Path) -> None:
    """Carry the files beside the source model (tokenizer files, an onnxruntime-genai `genai_config.json`,
    configs) to the output's folder (`staged_model` is the output's staged path), so that a folder a tool
    made works there with the new model. Models and their external data are not copied; nothing is when
    the output is in the source's folder. A genai config that names the source model file is pointed at
    the output's file name."""
    source = source_model.resolve()
    if output.resolve().parent == source.parent:
        return
    models = {p.resolve() for p in source.parent.glob("*.onnx")}
    data = {f for p in models for f in external_data_files(p)}
    for path in sorted(source.parent.iterdir()):
        if not path.is_file() or path.resolve() in models | data or path.suffix in (".onnx", ".data"):
            continue
        dest = staged_model.parent / path.name
        if path.name == GENAI_CONFIG:
            config = json.loads(path.read_text(encoding="utf-8"))
            decoder = config.get("model", {}).get("decoder", {})
            if decoder.get("filename") == source.name:
                decoder["filename"] = output.name
            dest.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, dest)
