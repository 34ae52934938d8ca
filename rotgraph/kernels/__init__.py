"""rotgraph's compiled onnxruntime kernels (`librotgraph_ops.so`, built by scripts/build_kernels.sh).

The library registers CPU kernels for the ops of the `rotgraph` domain (Hadamard, FakeQuant, KVQuantize,
KVDequantize, RotaryHadamard; see rotgraph_ops.cc). A model needs no library to run: each op is also an ONNX function in
the model. With the library registered in a session, onnxruntime runs the compiled kernels instead of
inlining the function bodies. The kernels read their configuration from node attributes that rotgraph
writes beside each overload; a model written before those attributes existed runs on the function bodies,
and so does a model whose rotgraph ops work on other values than float32 (the kernels are float32 only).
The library also exports plain functions for rotgraph's own use (`weight_functions`, loaded with ctypes):
the float64 weight rotation of rotgraph.hadamard and the float16 <-> float64 conversions of
rotgraph.weights; without the library both run in numpy.

Building the package (`pip install .`, a wheel; see setup.py) runs scripts/build_kernels.sh and installs the
library in this folder, where it is looked for first; the script alone builds it in build/kernels/ of the
source tree, where an editable install finds it. ROTGRAPH_KERNELS_LIBRARY names another one (before
both), ROTGRAPH_KERNELS=0 hides it. An install that could not build it leaves NOT_BUILT here, saying why,
and models then run on the function bodies with one warning. Beside the library the build writes librotgraph_ops.json, the machine and the CPU extensions (as /proc/cpuinfo names them) the library
was compiled for; the library is only registered on a CPU that has them all, checked without loading it
(loading code built for another CPU could already execute an instruction this one does not have).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.errors import RotgraphError

log = logging.getLogger(__name__)

PACKAGE_LIBRARY = Path(__file__).resolve().parent / "librotgraph_ops.so"  # installed by setup.py's build
NOT_BUILT = PACKAGE_LIBRARY.with_name("NOT_BUILT")  # setup.py's reason, where the install could not build it
_SOURCE_TREE = Path(__file__).resolve().parents[2]
BUILD_LIBRARY = _SOURCE_TREE / "build" / "kernels" / "librotgraph_ops.so"  # scripts/build_kernels.sh
IN_SOURCE_TREE = (_SOURCE_TREE / "scripts" / "build_kernels.sh").is_file()  # a checkout or an editable install
BUILD_HINT = (
    "build it with `bash scripts/build_kernels.sh` (scripts/setup.sh does)"
    if IN_SOURCE_TREE
    else "reinstall rotgraph where g++ and Debian's onnxruntime headers (or ROTGRAPH_ORT_INCLUDE) are at hand; "
    "`pip install -v` shows the build"
)
LIBRARY_ENV, SWITCH_ENV = "ROTGRAPH_KERNELS_LIBRARY", "ROTGRAPH_KERNELS"
CPUINFO = Path("/proc/cpuinfo")
# The attribute each op's kernel cannot do without (Hadamard: `a`, unless n is a power of two).
_REQUIRED = {"FakeQuant": "bits", "KVQuantize": "head_dim", "KVDequantize": "head_dim", "RotaryHadamard": "head_dim"}
_TRANSFORMS = ("Hadamard", "RotaryHadamard")  # ops that carry a Hadamard transform (`a` unless n = 2^k)
_warned: set[str] = set()


def configured_library() -> Path:
    """Where the library is looked for: ROTGRAPH_KERNELS_LIBRARY; else this package's folder (a pip install),
    then build/kernels/ of the source tree (a checkout, an editable install)."""
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    return PACKAGE_LIBRARY if PACKAGE_LIBRARY.is_file() or not IN_SOURCE_TREE else BUILD_LIBRARY


def library_path() -> Path | None:
    """The built library, or None. ROTGRAPH_KERNELS=0 in the environment hides it."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return None
    library = configured_library()
    return library if library.is_file() else None


def build_record(library: Path) -> Path:
    """The JSON record that scripts/build_kernels.sh writes beside the library."""
    return library.with_suffix(".json")


def cpu_flags() -> frozenset[str] | None:
    """The running CPU's flags as /proc/cpuinfo lists them (None where there is no /proc/cpuinfo)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return frozenset(value.split())
    return frozenset()


def unsupported_reason(library: Path) -> str | None:
    """Why this machine cannot run `library` (None: it can), from its build record and /proc/cpuinfo."""
    record = build_record(library)
    stamp = tuple(p.stat().st_mtime_ns if p.is_file() else None for p in (library, record))
    return _unsupported_reason(library, stamp)


@functools.cache
def _unsupported_reason(library: Path, stamp: tuple[int | None, ...]) -> str | None:
    """unsupported_reason, once per library and record version (`stamp`: their modification times)."""
    record = build_record(library)
    try:
        info = json.loads(record.read_text())
        machine, required = str(info["machine"]), [str(f) for f in info["cpu_flags"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{library} has no readable build record {record.name} ({type(e).__name__}: {e}); rebuild it"
    if machine != platform.machine():
        return f"{library} was built for {machine}, this machine is {platform.machine()}"
    if not required:
        return None
    flags = cpu_flags()
    if flags is None:
        return f"{library} needs the CPU extensions {', '.join(required)}, and {CPUINFO} cannot be read to check them"
    missing = [f for f in required if f not in flags]
    if missing:
        return (
            f"{library} was built for a CPU with {', '.join(missing)}, which this CPU lacks "
            "(rebuild it here with `bash scripts/build_kernels.sh`; ROTGRAPH_KERNEL_NATIVE=1 builds for the "
            "building machine only)"
        )
    return None


def _rotgraph_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, dict[str, int]]]:
    """The rotgraph-domain nodes of the graph and of its functions, each with the element types known in
    its scope (graph inputs, outputs, value_info and initializers)."""
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.value_info})
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes = [(n, types) for n in model.graph.node if n.domain == ROTGRAPH_DOMAIN]
    for function in model.functions:
        if function.domain == ROTGRAPH_DOMAIN:
            continue  # the body of one of rotgraph's ops: it runs only where the kernels are not registered
        scope = {v.name: v.type.tensor_type.elem_type for v in function.value_info}
        nodes += [(n, scope) for n in function.node if n.domain == ROTGRAPH_DOMAIN]
    return nodes


def _missing(model: onnx.ModelProto) -> list[str]:
    missing = []
    for node, _ in _rotgraph_nodes(model):
        needs = [_REQUIRED[node.op_type]] if node.op_type in _REQUIRED else []
        if node.op_type in _TRANSFORMS and not _is_power_of_two(node.overload):
            needs.append("a")  # the m x m matrix of an n = m * 2^k transform
        if any(need not in {a.name for a in node.attribute} for need in needs):
            missing.append(node.name or node.op_type)
    return missing


def missing_attributes(path: Path) -> list[str]:
    """rotgraph-domain nodes of the model at `path` that the kernels cannot run (written by an older
    rotgraph, without the attributes the kernels read). Loads the graph only, not external data."""
    return _missing(onnx.load(str(path), load_external_data=False))


def _not_float32(model: onnx.ModelProto) -> list[str]:
    """rotgraph-domain nodes whose first input is not float32 (or of a type that cannot be told: an
    unknown type is inferred once with onnx's shape inference, and a type still unknown counts)."""
    nodes = _rotgraph_nodes(model)
    if any(not scope.get(n.input[0]) for n, scope in nodes if n.op_type != "KVDequantize"):
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as e:  # a model onnx cannot infer: the types stay unknown
            log.debug("shape inference for the kernels' type check failed: %s", e)
        else:
            nodes = _rotgraph_nodes(model)
    bad = []
    for node, scope in nodes:
        # KVDequantize reads uint8 codes (written by KVQuantize, float32 by construction)
        if node.op_type != "KVDequantize" and scope.get(node.input[0]) != onnx.TensorProto.FLOAT:
            bad.append(node.name or node.op_type)
    return bad


def _is_power_of_two(overload: str) -> bool:
    """The transform size an overload starts with (`n64`, `n64_heads12of15`) is a power of two."""
    size = re.match(r"n(\d+)(_|$)", overload)
    n = int(size.group(1)) if size else 0
    return n > 0 and n & (n - 1) == 0


def _refuse(kernels: bool | None, reason: str, warn: bool = False) -> bool:
    """kernels=True: raise with `reason`; otherwise log it (a warning once per reason, when asked) and
    run the function bodies."""
    if kernels:
        raise RotgraphError(f"rotgraph's kernels cannot be used: {reason}")
    if warn and reason not in _warned:
        _warned.add(reason)
        log.warning("rotgraph's kernels are not used, models run on their ONNX function bodies: %s", reason)
    else:
        log.debug("rotgraph's kernels are not used: %s", reason)
    return False


def register(options: ort.SessionOptions, path: Path, kernels: bool | None) -> bool:
    """Register the library in `options` for the model at `path`. kernels=None: when it is built, runs on
    this CPU and the model carries the attributes and float32 values the kernels need; True: required
    (RotgraphError saying why not otherwise); False: never. Says whether it did."""
    if kernels is False:
        return False
    library = library_path()
    if library is None:  # a warning only where the install could not build it and this model has the ops
        warn = (
            kernels is None
            and _install_failed()
            and bool(_rotgraph_nodes(onnx.load(str(path), load_external_data=False)))
        )
        return _refuse(kernels, hidden_or_missing(), warn=warn)
    reason = unsupported_reason(library)
    if reason is not None:
        return _refuse(kernels, reason, warn=True)
    reason = model_reason(path)
    if reason is not None:
        return _refuse(kernels, reason)
    options.register_custom_ops_library(str(library))
    return True


def _install_failed() -> bool:
    """The installed package holds setup.py's NOT_BUILT, and neither the switch nor the environment's
    library is in play."""
    return os.environ.get(SWITCH_ENV, "1") != "0" and not os.environ.get(LIBRARY_ENV) and NOT_BUILT.is_file()


def hidden_or_missing() -> str:
    """Why library_path() found no library: the switch, an install that could not build it, or no build."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"{SWITCH_ENV}=0 hides them"
    if _install_failed():
        return f"not built when rotgraph was installed ({NOT_BUILT.read_text().strip()}): {BUILD_HINT}"
    return f"not built ({configured_library()} is missing): {BUILD_HINT}"


def model_reason(path: Path) -> str | None:
    """Why the kernels cannot run the model at `path` (None: they can): rotgraph nodes without the
    attributes the kernels read, or on values not known to be float32. Loads the graph only."""
    model = onnx.load(str(path), load_external_data=False)
    missing = _missing(model)
    if missing:
        return (
            f"{path}: {len(missing)} rotgraph nodes lack the attributes the kernels read (written by an older "
            f"rotgraph; first: {missing[0]}); requantize, or run without kernels"
        )
    other = _not_float32(model)
    if other:
        return (
            f"{path}: {len(other)} rotgraph nodes work on other values than float32 (first: {other[0]}; "
            "a type onnx cannot infer counts as other)"
        )
    return None


RotateF64 = Callable[[np.ndarray, int, int, int, int, np.ndarray | None, np.ndarray | None], None]


@dataclass(frozen=True)
class WeightFunctions:
    """The library's plain functions for rotgraph's weight rewrites (`weight_functions`)."""

    rotate_f64: RotateF64
    half_to_double: Callable[[np.ndarray], tuple[np.ndarray, int]] | None  # None: no F16C on this CPU
    double_to_half: Callable[[np.ndarray, np.ndarray], None] | None


def weight_functions() -> WeightFunctions | None:
    """The library's functions for the weight rewrites, or None where the library is hidden, not built, not
    for this CPU or built before them (rotgraph then computes in numpy; a warning once where it was built
    but cannot be used). They run without the GIL (ctypes), so threads run them at once.

    - `rotate_f64(x, pre, m, p, post, a, scale)`: x, contiguous float64 viewed as [pre, m * p, post], in
      place: every vector v along its middle axis -> (v @ kron(a, S_p)) * scale, S_p Sylvester's Hadamard
      matrix, a the m x m +-1 float64 matrix (None for m = 1), scale n float64 values or None;
    - `half_to_double(h)`: a 2-D float16 array (rows may be strided) -> (float64 copy, how many values are
      not finite), exactly;
    - `double_to_half(x, out)`: 2-D float64 -> float16 `out` (rows may be strided), rounded as numpy's
      astype rounds (to nearest, ties to even).
    """
    library = library_path()
    if library is None:
        return None
    reason = unsupported_reason(library)
    if reason is not None:
        _refuse(None, reason, warn=True)
        return None
    return _load_weight_functions(library, library.stat().st_mtime_ns)


def _rows(a: np.ndarray, what: str) -> int:
    """Elements between rows of a 2-D array whose rows are contiguous."""
    if a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != a.itemsize) or a.strides[0] % a.itemsize:
        raise ValueError(f"{what}: a 2-D array with contiguous rows, got shape {a.shape} strides {a.strides}")
    return a.strides[0] // a.itemsize


@functools.cache
def _load_weight_functions(library: Path, stamp: int) -> WeightFunctions | None:
    try:
        lib = ctypes.CDLL(str(library))
        rotate, to_double, to_half = lib.rotgraph_rotate_f64, lib.rotgraph_half_to_double, lib.rotgraph_double_to_half
    except (OSError, AttributeError) as e:
        _refuse(None, f"{library} lacks the weight functions ({e}): rebuild it; {BUILD_HINT}", warn=True)
        return None
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    rotate.argtypes = [pointer, size, size, size, size, pointer, pointer]
    rotate.restype = ctypes.c_int
    to_double.argtypes = [pointer, size, pointer, size, size]
    to_double.restype = ctypes.c_int64
    to_half.argtypes = [pointer, size, pointer, size, size, size]
    to_half.restype = ctypes.c_int

    def rotate_f64(
        x: np.ndarray, pre: int, m: int, p: int, post: int, a: np.ndarray | None, scale: np.ndarray | None
    ) -> None:
        n = m * p
        if not (x.dtype == np.float64 and x.flags.c_contiguous and x.flags.writeable and x.size == pre * n * post):
            raise ValueError(f"rotgraph_rotate_f64 needs a writeable contiguous float64 array of {pre} x {n} x {post}")
        for what, array, length in (("a", a, m * m), ("scale", scale, n)):
            if array is not None and not (
                array.dtype == np.float64 and array.flags.c_contiguous and array.size == length
            ):
                raise ValueError(f"rotgraph_rotate_f64: {what} must be a contiguous float64 array of {length} values")
        if m > 1 and a is None:
            raise ValueError("rotgraph_rotate_f64: m > 1 needs a")
        status = rotate(
            x.ctypes.data,
            pre,
            m,
            p,
            post,
            None if a is None else a.ctypes.data,
            None if scale is None else scale.ctypes.data,
        )
        if status != 0:
            raise RotgraphError(f"rotgraph_rotate_f64 refused sizes pre={pre} m={m} p={p} post={post}")

    def half_to_double(h: np.ndarray) -> tuple[np.ndarray, int]:
        if h.dtype != np.float16:
            raise ValueError(f"half_to_double: float16 input, got {h.dtype}")
        stride = _rows(h, "half_to_double")
        out = np.empty(h.shape, dtype=np.float64)
        nonfinite = to_double(h.ctypes.data, stride, out.ctypes.data, h.shape[0], h.shape[1])
        assert nonfinite >= 0  # checked at load: this CPU has F16C
        return out, int(nonfinite)

    def double_to_half(x: np.ndarray, out: np.ndarray) -> None:
        if x.dtype != np.float64 or out.dtype != np.float16 or x.shape != out.shape or not out.flags.writeable:
            raise ValueError(
                f"double_to_half: float64 {x.shape} into writeable float16, got {x.dtype} -> {out.dtype} {out.shape}"
            )
        status = to_half(
            x.ctypes.data, _rows(x, "double_to_half"), out.ctypes.data, _rows(out, "double_to_half"), *x.shape
        )
        assert status == 0

    probe = np.zeros((1, 1), dtype=np.float16)
    f16c = to_double(probe.ctypes.data, 1, np.zeros((1, 1)).ctypes.data, 1, 1) >= 0
    return WeightFunctions(rotate_f64, half_to_double if f16c else None, double_to_half if f16c else None)
