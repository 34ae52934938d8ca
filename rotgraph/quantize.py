"""The quantization pipeline: a declared list of stages (rotation, calibration, SmoothQuant, activations
and KV cache, weights, format) built from the options and run as one pass sequence."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph import io
from rotgraph.calibrate import CLIP_WINDOWS, CalibratePass, Calibration, Site
from rotgraph.constants import QUANTIZATION_KEY, ROTATION_KEY
from rotgraph.errors import RotgraphError, ValidationError
from rotgraph.evaluate import log_softmax, validation_logits, windows
from rotgraph.fakequant import ActSpec
from rotgraph.passes import UntieEmbeddingPass
from rotgraph.passes.center_activations import CenterActivationsPass
from rotgraph.passes.gqa_kv_cache import CacheScales, CalibrateGqaCachePass, GqaQuantizedCachePass
from rotgraph.passes.group_query_attention import FindFusableAttentionPass, GroupQueryAttentionPass
from rotgraph.passes.key_mean import SubtractKeyMeanPass
from rotgraph.passes.pack_gate_up import PackGateUpPass
from rotgraph.passes.pack_qkv import PackQKVPass
from rotgraph.passes.pack_rotary_qkv import PackRotaryQKVPass
from rotgraph.passes.quantize_activations import QuantizeActivationsPass
from rotgraph.passes.quantize_kv import QuantizeKVCachePass
from rotgraph.passes.quantize_weights import QuantizeWeightsPass
from rotgraph.passes.restore_ort_norms import RestoreOrtNormsPass
from rotgraph.passes.rotary_attention import RotaryIntoAttentionPass
from rotgraph.passes.rotary_embedding import RotaryEmbeddingPass
from rotgraph.passes.rotary_hadamard import RotaryHadamardPass
from rotgraph.passes.shared_kv_buffer import SharedKVBufferPass
from rotgraph.passes.smooth import SmoothQuantPass
from rotgraph.passes.split_rotary import SplitRotaryPass
from rotgraph.passes.standard_ops import INT4_OPSET, REDUCE_AXES_INPUT_OPSET, StandardOpsPass, check_opset
from rotgraph.passes.static_activations import (
    CalibrateActivationsPass,
    Ranges,
    Spreads,
    StaticActivationsPass,
    StaticSpec,
)
from rotgraph.pipeline import (
    RotateOptions,
    canonical_form_passes,
    check_inputs,
    rotation_metadata,
    rotation_passes,
    run_passes,
    validation_tokens,
)
from rotgraph.quant import WeightSpec
from rotgraph.structure import Attention

logger = logging.getLogger(__name__)

VALIDATION_WINDOWS, VALIDATION_SEQ_LEN = 2, 128

ORT_FORMATS = ("ort", "genai")  # onnxruntime's own ops (genai: an onnxruntime-genai folder)
KV_CACHES = ("auto", "onnxruntime", "rotgraph")
DEFAULT_CONTEXT_LENGTH = 4096  # RoPE tables inside attention when the model states no length
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
    # with online: an online Hadamard before o_proj as well (its input's heads mixed for one per-token scale);
    # None: where activations are 4-bit (benchmarks/RESULTS.md, "Online Hadamard before o_proj, and asymmetric
    # per-token activations")
    out_hadamard: bool | None = None
    smooth: float | None = None  # SmoothQuant migration strength alpha (after any rotation); None: off
    weights: str = "rtn"  # rtn | gptq
    group: int = 32  # 0: per output channel
    symmetric_weights: bool = True
    full_range: bool = False  # symmetric weights: all 2^b codes, per group where it helps (WeightSpec.full_range)
    act_clip: float | None = None  # None: 0.9 at 4 bits, 1.0 at 8
    # dynamic activations: each projection input's clip ratio searched on calibration text instead
    # (`rotgraph.calibrate.activation_clips`)
    act_clip_search: bool = False
    kv_clip: float | None = None  # None: 0.95 at 4 bits, 1.0 at 8
    seed: int = 0
    fmt: str = "qdq"  # qdq | ort | genai
    head_bits: int = 8  # embedding and lm_head: 4 or 8 (RTN, symmetric) or 16 (float)
    head_group: int | None = None  # their group size; None: the same as `group`
    shared_head: bool = False  # embedding and lm_head read one quantized table (see QuantizeWeightsPass)
    fused_attention: bool = True  # ort format, float KV cache: onnxruntime's GroupQueryAttention
    damp: float = 0.01
    act_order: bool = True
    calibration_windows: int = 32
    calibration_seq_len: int = 512
    text: str | None = None
    context_length: int | None = None  # ort/genai: positions RoPE inside attention covers; None: 4096
    deployment_fusion: bool = True  # ort/genai: RoPE into GroupQueryAttention, packed QKV, fused norms
    activations: str = "dynamic"  # dynamic: per token at run time | static: calibrated per-tensor Q/DQ (qdq)
    # dynamic: a per-token asymmetric grid (min/max and a zero point per token) instead of QuaRot's symmetric
    # one (benchmarks/RESULTS.md, the same section)
    act_asymmetric: bool = False
    # kv schemes, rotgraph's cache: subtract the keys' mean on calibration text before the cache quantizer
    # (`SubtractKeyMeanPass`; benchmarks/RESULTS.md, "Centered keys")
    center_keys: bool = False
    # dynamic activations: subtract each projection input's mean on calibration text before its quantizer,
    # added back as a bias (`CenterActivationsPass`; benchmarks/RESULTS.md, "Centered projection inputs")
    center_activations: bool = False
    # static: unsigned codes + zero point (onnxruntime's CPU integer kernels take uint8 activations where
    # one input feeds several MatMuls); True: signed codes, zero point 0
    act_symmetric: bool = False
    calibration: str = "minmax"  # static ranges: minmax | percentile | entropy (onnxruntime's histograms)
    # static: projection inputs whose max |x| exceeds this many times the median token's (massive
    # activations, e.g. an attention-sink token) get 16-bit Q/DQ over their full range; None: off
    wide_ratio: float | None = None
    opset: int | None = None  # qdq: standard ONNX only (no functions) at this opset; None: rotgraph's functions
    # kv schemes in the ort/genai formats: "onnxruntime" keeps the cache as codes inside GroupQueryAttention
    # (static per-channel scales), "rotgraph" as rotgraph's per-token codes beside an eager attention;
    # "auto": onnxruntime's for genai (the only cache onnxruntime-genai holds) and for kv8 (as good, smaller
    # and faster), rotgraph's for kv4 in the ort format (better quality; benchmarks/RESULTS.md, genai runs 6 and 11b)
    kv_cache: str = "auto"

    def __post_init__(self) -> None:
        """Refuse bad options before any model is loaded or calibrated."""
        if Scheme.parse(self.scheme).weight_bits == 16 and self.weights == "gptq":
            raise RotgraphError(f"scheme {self.scheme} keeps weights float: GPTQ has nothing to quantize")
        for field, value, allowed in (
            ("rotation", self.rotation, ("none", "quarot", "spinquant")),
            ("weights", self.weights, ("rtn", "gptq")),
            ("format", self.fmt, ("qdq", *ORT_FORMATS)),
            ("head bits", self.head_bits, (4, 8, 16)),
        ):
            if value not in allowed:
                raise RotgraphError(f"{field} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if (self.rotation == "spinquant") != (self.rotations is not None):
            raise RotgraphError("--rotation spinquant needs --rotations FILE, and --rotations needs spinquant")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise RotgraphError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth}")
        if self.group < 0 or self.calibration_windows < 1:
            raise RotgraphError("group must be >= 0 (0: per channel) and calibration windows >= 1")
        if self.shared_head and self.head_bits == 16:
            raise RotgraphError("a shared embedding and lm_head is quantized: pass --head-bits 4 or 8")
        if self.head_group is not None and self.head_group < 0:
            raise RotgraphError("head group must be >= 0 (0: per channel)")
        self._check_standard(Scheme.parse(self.scheme))
        self._check_kv_cache(Scheme.parse(self.scheme))
        self._check_clip(Scheme.parse(self.scheme))
        if self.act_asymmetric:
            self._check_asymmetric(Scheme.parse(self.scheme))
        if self.out_hadamard and (self.rotation == "none" or not self.online):
            raise RotgraphError("the online Hadamard before o_proj comes with a rotation's online Hadamards")
        if self.center_activations and (self.activations != "dynamic" or Scheme.parse(self.scheme).act_bits == 16):
            raise RotgraphError(
                "--center-activations moves what the per-token activation quantizers read: it needs quantized "
                f"dynamic activations, not scheme {self.scheme} with {self.activations} activations"
            )
        if self.center_keys and (Scheme.parse(self.scheme).kv_bits is None or self.gqa_cache):
            raise RotgraphError(
                "--center-keys moves the keys rotgraph's KV-cache quantizer reads: it needs a kv scheme and rotgraph's "
                "cache (the qdq format, or ort with --kv-cache rotgraph, the default at kv4), not GroupQueryAttention's"
            )

    def _check_clip(self, scheme: Scheme) -> None:
        for what, clip in (("activation", self.act_clip), ("KV cache", self.kv_clip)):
            if clip is not None and not 0.0 < clip <= 1.0:
                raise RotgraphError(f"{what} clip ratio {clip}: expected a ratio in (0, 1]")
        if not self.act_clip_search:
            return
        if self.act_clip is not None:
            raise RotgraphError("--act-clip takes a ratio or `search`, not both")
        if self.activations != "dynamic" or scheme.act_bits not in (4, 8):
            raise RotgraphError(
                f"--act-clip search sets the per-token quantizers of dynamic activations; scheme {self.scheme} "
                f"with {self.activations} activations has none"
            )
        if self.fmt in ORT_FORMATS and scheme.act_bits == 8 and scheme.weight_bits < 16:
            raise RotgraphError(
                f"--act-clip search: in the {self.fmt} format 8-bit activations are quantized by "
                "onnxruntime's MatMulNBits, which has no clip ratio"
            )

    def _check_asymmetric(self, scheme: Scheme) -> None:
        if self.activations != "dynamic" or scheme.act_bits == 16:
            raise RotgraphError(
                "--act-asymmetric sets the grid of dynamic per-token activations (static ones: --act-symmetric)"
            )
        if self.fmt in ORT_FORMATS and scheme.act_bits == 8 and scheme.weight_bits < 16:
            raise RotgraphError(
                f"--act-asymmetric: in the {self.fmt} format 8-bit activations are quantized by onnxruntime's "
                "MatMulNBits, which has its own grid"
            )

    def _check_kv_cache(self, scheme: Scheme) -> None:
        if self.kv_cache not in KV_CACHES:
            raise RotgraphError(f"KV cache {self.kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        if self.kv_cache == "auto" or scheme.kv_bits is None:
            return
        if self.kv_cache == "onnxruntime" and (self.fmt not in ORT_FORMATS or not self.fused_attention):
            raise RotgraphError(
                "--kv-cache onnxruntime lives inside GroupQueryAttention: it needs --format ort or genai "
                "without --eager-attention"
            )
        if self.kv_cache == "rotgraph" and self.fmt == "genai":
            raise RotgraphError("onnxruntime-genai holds only GroupQueryAttention's cache: use --kv-cache onnxruntime")

    @property
    def wants_out_hadamard(self) -> bool:
        """Whether the rotation inserts the online Hadamard before o_proj (`out_hadamard`, or by default
        with 4-bit activations)."""
        if self.rotation == "none" or not self.online:
            return False
        return self.out_hadamard if self.out_hadamard is not None else Scheme.parse(self.scheme).act_bits == 4

    @property
    def gqa_cache(self) -> bool:
        """Whether the KV cache is kept quantized inside onnxruntime's GroupQueryAttention."""
        if Scheme.parse(self.scheme).kv_bits is None or self.fmt not in ORT_FORMATS or not self.fused_attention:
            return False
        if self.kv_cache == "auto":
            return self.fmt == "genai" or Scheme.parse(self.scheme).kv_bits == 8
        return self.kv_cache == "onnxruntime"

    def _check_standard(self, scheme: Scheme) -> None:
        """Refuse static activations and opsets the format or the scheme cannot have."""
        if self.activations not in ("static", "dynamic"):
            raise RotgraphError(f"activations {self.activations!r}: expected static or dynamic")
        StaticSpec(8, self.act_symmetric, self.calibration)  # refuses an unknown calibration method
        if self.wide_ratio is not None:
            if self.activations != "static" or not self.wide_ratio > 1.0:
                raise RotgraphError(f"--wide-ratio {self.wide_ratio}: a ratio > 1, for static activations")
            if self.opset is not None and self.opset < INT4_OPSET:
                raise RotgraphError(f"--wide-ratio: 16-bit Q/DQ needs --opset {INT4_OPSET} or more, not {self.opset}")
        if self.fmt != "qdq" and (self.activations == "static" or self.opset is not None):
            raise RotgraphError(f"static activations and --opset are for the qdq format, not {self.fmt}")
        if self.opset is None:
            return
        check_opset(self.opset)
        static = self.activations == "static"
        bits = {"weights": scheme.weight_bits}
        if static:  # dynamic quantizers compute in float: only their storage has bits
            bits |= {"activations": scheme.act_bits, "KV cache": scheme.kv_bits or 16}
        four = [what for what, b in bits.items() if b == 4]
        if self.opset < INT4_OPSET and four:
            raise RotgraphError(
                f"opset {self.opset} has no 4-bit types (INT4 arrives in opset {INT4_OPSET}): 4-bit "
                f"{' and '.join(four)} need --opset {INT4_OPSET} or more, or an 8-bit scheme"
            )
        if self.opset < INT4_OPSET and self.group and scheme.weight_bits < 16:
            raise RotgraphError(
                f"opset {self.opset}: block-wise weight scales (--group {self.group}) need opset {INT4_OPSET}; "
                "pass --group 0 (per channel)"
            )
        if self.opset < REDUCE_AXES_INPUT_OPSET and scheme.kv_bits == 4 and not static:
            raise RotgraphError(f"opset {self.opset}: the dynamic 4-bit KV cache packs codes with opset-18 bit ops")


@dataclass(frozen=True)
class QuantReport:
    output: Path
    seconds: float
    options: QuantOptions
    validation: Agreement | None = None


def calibration_tokens(model_path: Path, options: QuantOptions) -> np.ndarray:
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    tok = io.find_tokenizer(model_path)
    if tok is None:
        used = [
            n
            for n, on in (
                ("GPTQ", options.weights == "gptq"),
                ("SmoothQuant", options.smooth is not None),
                ("static activations", options.activations == "static"),
                ("the onnxruntime KV cache", options.gqa_cache),
                ("--center-keys", options.center_keys),
                ("--center-activations", options.center_activations),
            )
            if on
        ]
        hint = " (or --activations dynamic)" if used == ["static activations"] else ""
        raise RotgraphError(f"calibration ({', '.join(used)}) needs tokenizer.json beside {model_path}{hint}")
    text = load_text("calibration", options.text)
    length = options.calibration_seq_len
    if options.context_length is not None and options.context_length < length:
        logger.info("calibration windows of %d tokens: the model's context length", options.context_length)
        length = options.context_length  # RoPE tables end there
    return windows(encode(tok, text), options.calibration_windows, length)


def activation_spec(scheme: Scheme, act_clip: float | None = None, symmetric: bool = True) -> ActSpec | None:
    """The per-token activation quantizer of `scheme` (symmetric unless asked, clip 0.9 at 4 bits unless
    given); None when activations stay float."""
    if scheme.act_bits not in (4, 8):
        return None
    return ActSpec(
        scheme.act_bits, symmetric, 0, act_clip if act_clip is not None else (0.9 if scheme.act_bits == 4 else 1.0)
    )


def activation_passes(
    scheme: Scheme,
    act_clip: float | None = None,
    kv_clip: float | None = None,
    skip_int8: bool = False,
    store_cache: bool = True,
    clips: Mapping[Site, float] | None = None,
    act_symmetric: bool = True,
) -> list[ir.passes.PassBase]:
    """The FakeQuant passes of `scheme`: per-token activations (symmetric unless `act_symmetric` is off,
    clip 0.9 at 4 bits unless given, or per input from `clips`; none at 8 bits with `skip_int8`, where the runtime's int8 kernels
    quantize) and the KV cache (asymmetric per token and head, clip 0.95 at 4 bits unless given; stored
    as codes where the graph has cache inputs, unless `store_cache` is off)."""
    passes: list[ir.passes.PassBase] = []
    act = activation_spec(scheme, act_clip, act_symmetric)
    if act is not None and (act.bits == 4 or not skip_int8):
        passes.append(QuantizeActivationsPass(act, clips))
    kv = kv_spec(scheme, kv_clip)
    if kv is not None:
        passes.append(QuantizeKVCachePass(kv, store=store_cache))
    return passes


def kv_spec(scheme: Scheme, kv_clip: float | None = None) -> ActSpec | None:
    """The KV cache's quantizer of `scheme` (asymmetric per token and head, clip 0.95 at 4 bits unless
    given); None for a float cache."""
    if scheme.kv_bits is None:
        return None
    return ActSpec(scheme.kv_bits, False, 0, kv_clip if kv_clip is not None else (0.95 if scheme.kv_bits == 4 else 1.0))


def rotate_options(options: QuantOptions) -> RotateOptions:
    """The float rotation `quantize` applies. R3 (Hadamard on Q and K) only serves a quantized KV cache:
    with a float cache it cancels exactly in Q K^T and would cost decoding time for nothing."""
    return RotateOptions(
        seed=options.seed,
        online=options.online,
        qk_hadamard=Scheme.parse(options.scheme).kv_bits is not None,
        out_hadamard=options.wants_out_hadamard,
        rotations=options.rotations,
    )


def restore_norms(options: QuantOptions) -> RestoreOrtNormsPass:
    """onnxruntime's fused norms, given back where the input had them, and in the ort and genai formats
    always (unless `deployment_fusion` is off)."""
    return RestoreOrtNormsPass(always=options.fmt in ORT_FORMATS and options.deployment_fusion)


@dataclass(frozen=True)
class Stage:
    """One step of the quantization pipeline: a name a reader can print and the passes it runs."""

    name: str
    passes: tuple[ir.passes.PassBase, ...]

    def __str__(self) -> str:
        return f"{self.name}: {', '.join(type(p).__name__ for p in self.passes)}"


def quantize_stages(
    options: QuantOptions,
    calibration: Calibration | None = None,
    scratch: Path | None = None,
    calibrated: bool = False,
) -> list[Stage]:
    """The declared pipeline of `quantize` for `options`, in order: rotation (or the canonical form),
    calibration and SmoothQuant, activations and KV cache, weights, and the format's own rewrites.

    `calibration` holds the calibration windows and receives what the calibration stages measure; with
    `calibrated`, it already holds the GPTQ statistics (an earlier run on the same model) and that stage
    is left out. `scratch` is where weights computed in memory go (see `rotgraph.probe`) and where
    quantized tensors are spilled as they are produced; None keeps everything in memory.
    """
    scheme = Scheme.parse(options.scheme)
    stages: list[Stage] = []
    if scheme.kv_bits is not None:  # the cache quantizer (and R3) need the keys after RoPE, outside the op
        stages.append(Stage("RoPE out of fused attention", (SplitRotaryPass(),)))
    if options.rotation != "none":
        stages.append(Stage("rotation", tuple(rotation_passes(rotate_options(options)))))
    else:
        stages.append(Stage("canonical form", tuple(canonical_form_passes())))
    needs_gptq = options.weights == "gptq" and not calibrated
    if (options.smooth is not None or needs_gptq or options.act_clip_search) and calibration is None:
        raise RotgraphError("SmoothQuant, GPTQ and the activation clip search need calibration tokens")
    if options.smooth is not None:
        assert calibration is not None
        stages.append(Stage("calibration (activation ranges)", (CalibratePass(calibration, "absmax", scratch),)))
        stages.append(Stage("SmoothQuant", (SmoothQuantPass(calibration.absmax, options.smooth),)))
    if options.center_activations:  # before GPTQ and the clip search, which then see centered inputs
        if calibration is None:
            raise RotgraphError("--center-activations needs calibration tokens")
        tokens = calibration.tokens[:CLIP_WINDOWS]
        stages.append(Stage("calibration (activation means)", (CenterActivationsPass(tokens, scratch),)))
    if needs_gptq:
        assert calibration is not None
        stages.append(Stage("calibration (GPTQ Hessians)", (CalibratePass(calibration, "hessian", scratch),)))
    # onnxruntime's MatMulNBits with accuracy_level 4 quantizes its input to int8 itself (per block of
    # the weight group, finer than per token), so the ort format leaves 8-bit activations to it.
    ort_int8 = options.fmt in ORT_FORMATS and scheme.act_bits <= 8 and scheme.weight_bits < 16
    gqa_cache = options.gqa_cache
    fused = options.fmt in ORT_FORMATS and options.fused_attention and (scheme.kv_bits is None or gqa_cache)
    attentions: list[Attention] = []
    if fused:  # found before the weights change form (discovery reads MatMul projections)
        stages.append(Stage("find attention to fuse", (FindFusableAttentionPass(attentions),)))
    static = options.activations == "static"
    act_scheme = dataclasses.replace(scheme, kv_bits=None) if gqa_cache else scheme  # the op quantizes its cache
    clips = None
    if options.act_clip_search:  # after SmoothQuant, which changes the inputs; the weights are still float
        assert calibration is not None
        spec = activation_spec(scheme, symmetric=not options.act_asymmetric)
        stages.append(Stage("calibration (activation clip)", (CalibratePass(calibration, "clip", scratch, spec),)))
        clips = calibration.clips
    act = (
        []
        if static
        else activation_passes(
            act_scheme,
            options.act_clip,
            options.kv_clip,
            skip_int8=ort_int8,
            clips=clips,
            act_symmetric=not options.act_asymmetric,
        )
    )
    if options.center_keys:  # on the float keys, before the cache quantizer reads them
        if calibration is None:
            raise RotgraphError("--center-keys needs calibration tokens")
        tokens = calibration.tokens[:CLIP_WINDOWS]
        stages.append(Stage("calibration (key means)", (SubtractKeyMeanPass(tokens, scratch),)))
    if act:
        stages.append(Stage("activations and KV cache", tuple(act)))
    if scheme.weight_bits < 16:
        head_group = options.group if options.head_group is None else options.head_group
        head_spec = (
            WeightSpec(options.head_bits, True, head_group or None, full_range=options.full_range)
            if options.head_bits < 16
            else None
        )
        weights = QuantizeWeightsPass(
            WeightSpec(
                scheme.weight_bits, options.symmetric_weights, options.group or None, full_range=options.full_range
            ),
            options.weights,
            calibration.hessians if calibration is not None and options.weights == "gptq" else None,
            options.damp,
            options.act_order,
            head_spec,
            "ort" if options.fmt == "genai" else options.fmt,
            accuracy_level=4 if ort_int8 else 0,
            spill_dir=scratch,
            shared_head=options.shared_head,
        )
        untie = head_spec is not None and not options.shared_head
        stages.append(Stage("weights", (UntieEmbeddingPass(), weights) if untie else (weights,)))
    if fused:
        stages.append(Stage("onnxruntime format", (GroupQueryAttentionPass(attentions),)))
    if fused and options.deployment_fusion:
        lean: tuple[ir.passes.PassBase, ...] = (
            RotaryIntoAttentionPass(options.context_length or DEFAULT_CONTEXT_LENGTH),
            RotaryEmbeddingPass(options.context_length or DEFAULT_CONTEXT_LENGTH),
            RotaryHadamardPass(),
            PackQKVPass(),
            PackGateUpPass(),
        )
        stages.append(Stage("deployment fusion", lean))
    if gqa_cache:
        assert scheme.kv_bits is not None
        if calibration is None:
            raise RotgraphError("a quantized GroupQueryAttention cache needs calibration tokens")
        found: list[CacheScales] = []
        stages.append(
            Stage(
                "KV cache inside GroupQueryAttention",
                (
                    CalibrateGqaCachePass(found, calibration.tokens, scheme.kv_bits, scratch),
                    GqaQuantizedCachePass(found, scheme.kv_bits),
                ),
            )
        )
    if fused and options.deployment_fusion:  # after the cache's calibration, which reads K and V apart
        stages.append(Stage("packed QKV before RoPE and R3", (PackRotaryQKVPass(),)))
    if fused and options.deployment_fusion and options.fmt == "genai":
        stages.append(Stage("shared KV buffer", (SharedKVBufferPass(),)))
    if static and (passes := static_activation_passes(options, calibration, scratch)):
        # after the weights: discovery does not look through activation Q/DQ pairs, and the ranges are
        # those the quantized weights produce
        stages.append(Stage("static activations and KV cache", tuple(passes)))
    if options.opset is None:
        stages.append(Stage("clean-up", (restore_norms(options), RemoveUnusedNodesPass())))
    else:  # onnxruntime's fused norms are not standard ONNX: they stay expanded
        stages.append(Stage("clean-up", (RemoveUnusedNodesPass(),)))
        stages.append(Stage(f"standard ONNX at opset {options.opset}", (StandardOpsPass(options.opset),)))
    return stages


def static_activation_passes(
    options: QuantOptions, calibration: Calibration | None, scratch: Path | None
) -> list[ir.passes.PassBase]:
    """Calibrate per-tensor ranges of the projection inputs (and of the keys and values with a kv
    scheme, asymmetric) on the calibration windows, then insert QuantizeLinear/DequantizeLinear pairs."""
    scheme = Scheme.parse(options.scheme)
    if scheme.act_bits == 16 and scheme.kv_bits is None:
        return []
    if scheme.act_bits == 16:
        raise RotgraphError(f"{options.scheme}: static quantization of the KV cache alone is not supported")
    if calibration is None:
        raise RotgraphError("static activation scales need calibration tokens")
    spec = StaticSpec(scheme.act_bits, options.act_symmetric, options.calibration)
    kv = StaticSpec(scheme.kv_bits, False, options.calibration) if scheme.kv_bits is not None else None
    ranges: Ranges = {}
    spreads: Spreads = {}
    return [
        CalibrateActivationsPass(ranges, calibration.tokens, spec, kv is not None, scratch, spreads),
        StaticActivationsPass(ranges, spec, kv, options.wide_ratio, spreads),
    ]


def quantize_model(
    model: ir.Model,
    options: QuantOptions,
    calibration: np.ndarray | None = None,
    hessians: dict[Site, np.ndarray] | None = None,
    scratch: Path | None = None,
) -> dict[Site, np.ndarray] | None:
    """Run `quantize_stages(options)` on `model` in place and record the options in its metadata.

    SmoothQuant and GPTQ need `calibration` tokens [windows, seq_len]; GPTQ can instead take `hessians`
    from an earlier call on the same model file with the same rotation and smoothing (they are keyed by
    structural site and returned, so several schemes can share one calibration run). `scratch`: see
    `quantize_stages` (the caller creates and removes the folder).
    """
    if ROTATION_KEY in model.metadata_props and options.rotation != "none":
        raise RotgraphError(f"model is already rotated ({model.metadata_props[ROTATION_KEY]})")
    data = Calibration(calibration if calibration is not None else np.zeros((0, 0), np.int64))
    if hessians is not None:
        data.hessians.update(hessians)
    stages = quantize_stages(
        options, data if calibration is not None or hessians else None, scratch, calibrated=hessians is not None
    )
    logger.debug("quantize stages:\n%s", "\n".join(map(str, stages)))
    run_passes(model, [p for stage in stages for p in stage.passes])
    if options.rotation != "none":
        model.metadata_props[ROTATION_KEY] = rotation_metadata(rotate_options(options), model)
    model.metadata_props[QUANTIZATION_KEY] = json.dumps(asdict(options))
    return dict(data.hessians) if options.weights == "gptq" else None


@dataclass(frozen=True)
class Agreement:
    """How the quantized model's next-token distributions compare with the float model's."""

    kl: float  # mean KL(float || quantized) over positions, nats
    top1: float  # fraction of positions with the same argmax
    unrelated_kl: float  # mean KL(float at t || float at another position): what knowing nothing scores

    def __str__(self) -> str:
        return f"KL to float {self.kl:.4f} nats (unrelated positions: {self.unrelated_kl:.4f}), top-1 {self.top1:.3f}"


def agreement(reference: np.ndarray, logits: np.ndarray) -> Agreement:
    """Compare logits [windows, seq, vocab] of a quantized model with the float model's."""
    p = log_softmax(reference)
    q = log_softmax(logits)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    shifted = np.roll(p, p.shape[1] // 2, axis=1)  # each position against one half a window away
    unrelated = float((np.exp(p) * (p - shifted)).sum(-1).mean())
    top1 = float((p.argmax(-1) == q.argmax(-1)).mean())
    return Agreement(kl, top1, unrelated)


def check_against_float(input_path: Path, output: Path, tokens: np.ndarray) -> Agreement:
    """Run the float input and the quantized output on `tokens`; refuse an output whose logits are not
    finite or that tracks the float model no better than the float model tracks itself at unrelated
    positions (a broken output, e.g. misplaced scales)."""
    reference, logits = validation_logits(input_path, output, tokens)  # with a left-padded row if it takes one
    if not np.isfinite(logits).all():
        raise ValidationError("the quantized model produces non-finite logits; nothing written")
    found = agreement(reference, logits)
    if not found.kl < found.unrelated_kl:
        raise ValidationError(f"the quantized model is broken: {found}; nothing written")
    return found


def quantize(
    input_path: Path, output: Path, options: QuantOptions = QuantOptions(), validate: bool = True
) -> QuantReport:
    """Quantize the model at `input_path` into `output` (atomically: nothing appears unless it is done
    and validated). Scratch files (weights computed in memory, quantized tensors spilled as they are
    produced, so memory stays at the working set of one weight) live in the output's staging folder.
    With `validate`, onnxruntime runs the float input and the result on validation text (loading both
    whole) and a broken result is refused with the figures (`check_against_float`)."""
    if options.fmt == "genai" and output.suffix != ".onnx":
        from rotgraph.genai import quantize_folder

        return quantize_folder(input_path, output, options, validate)
    start = time.perf_counter()
    io.check_output_path([input_path], output)
    model = io.load_model(input_path)
    check_inputs(model)
    needs_text = (
        options.weights == "gptq"
        or options.smooth is not None
        or options.activations == "static"
        or options.gqa_cache
        or options.act_clip_search
        or options.center_keys
        or options.center_activations
    )
    calibration = calibration_tokens(input_path, options) if needs_text else None
    found = None
    with io.staged_output(output) as staged:
        scratch = staged.parent / "scratch"
        scratch.mkdir()
        try:
            quantize_model(model, options, calibration, scratch=scratch)
            io.save_model(model, staged)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        io.copy_companions(input_path, staged, output)
        if validate:
            tokens = validation_tokens(input_path, _vocab_size(model), VALIDATION_WINDOWS * VALIDATION_SEQ_LEN)
            found = check_against_float(input_path, staged, tokens.reshape(VALIDATION_WINDOWS, VALIDATION_SEQ_LEN))
            logger.info("validation: %s", found)
    return QuantReport(output, time.perf_counter() - start, options, found)


def _vocab_size(model: ir.Model) -> int:
    """The last dimension of the logits (the first graph output), for seeded validation ids."""
    shape = model.graph.outputs[0].shape
    size = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(size, int):
        raise RotgraphError(f"cannot tell the vocabulary size from the logits output {model.graph.outputs[0].name!r}")
    return size
