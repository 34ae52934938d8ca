"""The quantization pipeline: optional QuaRot rotation, weights (RTN or GPTQ), activations, KV cache."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import io
from rotgraph.calibrate import input_absmax, input_hessians
from rotgraph.errors import RotgraphError
from rotgraph.evaluate import make_session, run_logits, windows
from rotgraph.fakequant import ActSpec
from rotgraph.passes import GroupQueryAttentionPass, UntieEmbeddingPass
from rotgraph.passes.quantize_activations import QuantizeActivationsPass
from rotgraph.passes.quantize_kv import QuantizeKVCachePass
from rotgraph.passes.quantize_weights import QuantizeWeightsPass
from rotgraph.passes.smooth import SmoothQuantPass
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model, run_passes
from rotgraph.quant import WeightSpec
from rotgraph.structure import Attention, discover

logger = logging.getLogger(__name__)

_SCHEME = re.compile(r"^w(4|8|16)a(4|8|16)(?:kv(4|8))?$")


@dataclass(frozen=True)
class Scheme:
    weight_bits: int
    act_bits: int  # 16: activations stay float
    kv_bits: int | None

    @classmethod
    def parse(cls, text: str) -> Scheme:
        m = _SCHEME.match(text)
        if m is None:
            raise RotgraphError(f"scheme {text!r}: expected w<4|8|16>a<4|8|16>[kv<4|8>], e.g. w4a8, w4a4kv4, w16a4kv4")
        return cls(int(m[1]), int(m[2]), int(m[3]) if m[3] else None)


@dataclass(frozen=True)
class QuantOptions:
    """Defaults follow QuaRot: symmetric weights and activations, activation clip 0.9 at 4 bits,
    asymmetric KV cache per token and head with clip 0.95 at 4 bits."""

    scheme: str = "w4a8"
    rotation: str = "quarot"  # none | quarot | spinquant (needs `rotations`)
    rotations: str | None = None  # with spinquant: the `rotgraph learn` file
    online: bool = True  # with quarot: insert R3/R4 online Hadamards
    smooth: float | None = None  # SmoothQuant migration strength alpha (after any rotation); None: off
    weights: str = "rtn"  # rtn | gptq
    group: int = 32  # 0: per output channel
    symmetric_weights: bool = True
    act_clip: float | None = None  # None: 0.9 at 4 bits, 1.0 at 8
    kv_clip: float | None = None  # None: 0.95 at 4 bits, 1.0 at 8
    seed: int = 0
    fmt: str = "qdq"  # qdq | ort
    head_bits: int = 8  # embedding and lm_head: 8 (RTN, same group) or 16 (float)
    fused_attention: bool = True  # ort format, float KV cache: onnxruntime's GroupQueryAttention
    damp: float = 0.01
    act_order: bool = True
    calibration_windows: int = 32
    calibration_seq_len: int = 512
    text: str | None = None

    def __post_init__(self) -> None:
        """Refuse bad options before any model is loaded or calibrated."""
        if Scheme.parse(self.scheme).weight_bits == 16 and self.weights == "gptq":
            raise RotgraphError(f"scheme {self.scheme} keeps weights float: GPTQ has nothing to quantize")
        for field, value, allowed in (
            ("rotation", self.rotation, ("none", "quarot", "spinquant")),
            ("weights", self.weights, ("rtn", "gptq")),
            ("format", self.fmt, ("qdq", "ort")),
            ("head bits", self.head_bits, (8, 16)),
        ):
            if value not in allowed:
                raise RotgraphError(f"{field} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if (self.rotation == "spinquant") != (self.rotations is not None):
            raise RotgraphError("--rotation spinquant needs --rotations FILE, and --rotations needs spinquant")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise RotgraphError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth}")
        if self.group < 0 or self.calibration_windows < 1:
            raise RotgraphError("group must be >= 0 (0: per channel) and calibration windows >= 1")


@dataclass(frozen=True)
class QuantReport:
    output: Path
    seconds: float
    options: QuantOptions


def calibration_tokens(model_path: Path, options: QuantOptions) -> np.ndarray:
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    tok = io.find_tokenizer(model_path)
    if tok is None:
        raise RotgraphError(f"GPTQ calibration needs tokenizer.json beside {model_path}")
    text = load_text("calibration", options.text)
    return windows(encode(tok, text), options.calibration_windows, options.calibration_seq_len)


def activation_spec(scheme: Scheme, act_clip: float | None = None) -> ActSpec | None:
    """The per-token activation quantizer of `scheme` (symmetric, clip 0.9 at 4 bits unless given);
    None when activations stay float."""
    if scheme.act_bits not in (4, 8):
        return None
    return ActSpec(
        scheme.act_bits, True, 0, act_clip if act_clip is not None else (0.9 if scheme.act_bits == 4 else 1.0)
    )


def activation_passes(
    scheme: Scheme, act_clip: float | None = None, kv_clip: float | None = None, skip_int8: bool = False
) -> list[ir.passes.PassBase]:
    """The FakeQuant passes of `scheme`: per-token activations (symmetric, clip 0.9 at 4 bits unless
    given; none at 8 bits with `skip_int8`, where the runtime's int8 kernels quantize) and the KV cache
    (asymmetric per token and head, clip 0.95 at 4 bits unless given)."""
    passes: list[ir.passes.PassBase] = []
    act = activation_spec(scheme, act_clip)
    if act is not None and (act.bits == 4 or not skip_int8):
        passes.append(QuantizeActivationsPass(act))
    if scheme.kv_bits is not None:
        clip = kv_clip if kv_clip is not None else (0.95 if scheme.kv_bits == 4 else 1.0)
        passes.append(QuantizeKVCachePass(ActSpec(scheme.kv_bits, False, 0, clip)))
    return passes


def quantize_model(
    model: ir.Model,
    options: QuantOptions,
    calibration: np.ndarray | None = None,
    hessians: dict[str, np.ndarray] | None = None,
    spill_dir: Path | None = None,
) -> dict[str, np.ndarray] | None:
    """Apply `options` to `model` in place (rotation, SmoothQuant, then weights, activations, KV cache).

    With `spill_dir`, quantized tensors are written there as they are produced (`SpillFile`) instead
    of being held in memory until the model is saved; the caller removes the folder after the save.

    SmoothQuant and GPTQ need `calibration` tokens; GPTQ can instead take `hessians` from an earlier
    call on the same model file with the same rotation and smoothing (they are returned, so several
    schemes can share one calibration run).
    """
    scheme = Scheme.parse(options.scheme)
    if options.rotation != "none":
        # R3 (Hadamard on Q and K) only serves a quantized KV cache: with a float cache it cancels exactly
        # in Q K^T and would cost decoding time for nothing.
        r3 = scheme.kv_bits is not None
        rotate_model(
            model,
            RotateOptions(seed=options.seed, online=options.online, qk_hadamard=r3, rotations=options.rotations),
        )
    else:
        canonicalize(model)
    if options.smooth is not None:
        if calibration is None:
            raise RotgraphError("SmoothQuant needs calibration tokens")
        run_passes(model, [SmoothQuantPass(input_absmax(model, calibration), options.smooth)])
    if options.weights == "gptq" and hessians is None:
        if calibration is None:
            raise RotgraphError("GPTQ needs calibration tokens")
        hessians = input_hessians(model, calibration)
    # onnxruntime's MatMulNBits with accuracy_level 4 quantizes its input to int8 itself (per block of
    # the weight group, finer than per token), so the ort format leaves 8-bit activations to it.
    ort_int8 = options.fmt == "ort" and scheme.act_bits <= 8 and scheme.weight_bits < 16
    passes = activation_passes(scheme, options.act_clip, options.kv_clip, skip_int8=ort_int8)
    if scheme.weight_bits < 16:
        head_spec = None
        if options.head_bits == 8:
            head_spec = WeightSpec(8, True, options.group or None)
            run_passes(model, [UntieEmbeddingPass()])
        passes.append(
            QuantizeWeightsPass(
                WeightSpec(scheme.weight_bits, options.symmetric_weights, options.group or None),
                options.weights,
                hessians,
                options.damp,
                options.act_order,
                head_spec,
                options.fmt,
                accuracy_level=4 if ort_int8 else 0,
                spill_dir=spill_dir,
            )
        )
    attentions = _fusable_attention(model, options, scheme)  # found before the weights change form
    if passes:  # w16a16: nothing to quantize (a rotated float model, or only the ort format's attention)
        run_passes(model, passes)
    if attentions:
        run_passes(model, [GroupQueryAttentionPass(attentions)])
    model.metadata_props["rotgraph.quantization"] = json.dumps(asdict(options))
    return hessians


def _fusable_attention(model: ir.Model, options: QuantOptions, scheme: Scheme) -> list[Attention]:
    """The attentions the ort format fuses into GroupQueryAttention: those of a decoder with a float,
    unwindowed KV cache (a cache stored as codes keeps rotgraph's KV ops; a windowed one, eager
    attention)."""
    if options.fmt != "ort" or not options.fused_attention or scheme.kv_bits is not None:
        return []
    attentions = [block.attention for block in discover(model).blocks]
    if not all(a.key_cache is not None and a.value_cache is not None for a in attentions):
        return []
    if any(a.key_cache.window for a in attentions if a.key_cache is not None):
        logger.info("sliding-window KV cache: attention stays eager (GroupQueryAttention fusion not applied)")
        return []
    return attentions


def quantize(
    input_path: Path, output: Path, options: QuantOptions = QuantOptions(), validate: bool = True
) -> QuantReport:
    """Quantize the model at `input_path` into `output`. Quantized tensors go to a scratch file beside
    the output as they are produced (memory stays at the working set of one weight). With `validate`,
    onnxruntime runs the result (loading it whole) and its logits must be finite."""
    start = time.perf_counter()
    io.check_output_path([input_path], output)
    model = io.load_model(input_path)
    needs_text = options.weights == "gptq" or options.smooth is not None
    calibration = calibration_tokens(input_path, options) if needs_text else None
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.spill.", dir=output.parent) as spill:
        quantize_model(model, options, calibration, spill_dir=Path(spill))
        with io.staged_output(output) as staged:
            io.save_model(model, staged)
            io.copy_tokenizer(input_path, staged)
            if validate:
                logits = run_logits(make_session(staged, "disable"), np.arange(16, dtype=np.int64)[None, :])
                if not np.isfinite(logits).all():
                    raise RotgraphError("the quantized model produces non-finite logits; nothing written")
    return QuantReport(output, time.perf_counter() - start, options)
