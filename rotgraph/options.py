"""The flat quantization plan the pipeline's stages read: `Scheme` and `QuantOptions`.

Users describe what they want with `rotgraph.config.QuantConfig` (nested, with `auto` fields and named
recipes); `rotgraph.config.to_options` resolves it into a `QuantOptions`. The plan's own defaults are the
plain recipe (QuaRot + RTN, QuaRot's fixed clips: nothing that needs calibration text), which tests and
benchmarks build directly. `QuantOptions` validates the combination once, before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rotgraph.errors import RotgraphError

# The opsets of standard ONNX rotgraph writes (`--format qdq`, `output.opset`), and what arrives when.
MIN_OPSET, MAX_OPSET = 17, 23
RMS_NORM_OPSET = 23  # RMSNormalization
INT4_OPSET = 21  # INT4/UINT4 tensors, QuantizeLinear/DequantizeLinear block_size
REDUCE_AXES_INPUT_OPSET = 18  # Reduce* take axes as an input (ReduceSum since 13)
STATIC_RANGES = ("minmax", "percentile", "entropy")  # how static activation ranges are calibrated

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


def setting(option: str, *value: object) -> str:
    """How a user sets the plan field `option` on the command line (`rotgraph.config.setting`, which reads
    the configuration's flags), for messages."""
    from rotgraph.config import setting as config_setting  # config builds on this module

    return config_setting(option, *value)


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
    gptq_sequential: bool = False  # GPTQ block by block on the earlier blocks' quantized outputs
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
        if self.gptq_sequential and self.weights != "gptq":
            raise RotgraphError(
                f"sequential GPTQ ({setting('gptq_sequential')}) needs GPTQ weights ({setting('weights', 'gptq')})"
            )
        for field, value, allowed in (
            ("rotation", self.rotation, ("none", "quarot", "spinquant")),
            ("weights", self.weights, ("rtn", "gptq")),
            ("format", self.fmt, ("qdq", *ORT_FORMATS)),
            ("head bits", self.head_bits, (4, 8, 16)),
        ):
            if value not in allowed:
                raise RotgraphError(f"{field} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if (self.rotation == "spinquant") != (self.rotations is not None):
            learned, rotations = setting("rotation", "spinquant"), setting("rotations", "FILE")
            raise RotgraphError(f"{learned} needs {rotations}, and {rotations} needs {learned}")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise RotgraphError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth} ({setting('smooth')})")
        if self.group < 0 or self.calibration_windows < 1:
            raise RotgraphError("group must be >= 0 (0: per channel) and calibration windows >= 1")
        if self.shared_head and self.head_bits == 16:
            raise RotgraphError(
                f"a shared embedding and lm_head ({setting('shared_head')}) is quantized: pass "
                f"{setting('head_bits', 8)} (or 4), or {setting('shared_head', False)}"
            )
        if self.head_group is not None and self.head_group < 0:
            raise RotgraphError("head group must be >= 0 (0: per channel)")
        self._check_standard(Scheme.parse(self.scheme))
        self._check_kv_cache(Scheme.parse(self.scheme))
        self._check_clip(Scheme.parse(self.scheme))
        if self.act_asymmetric:
            self._check_asymmetric(Scheme.parse(self.scheme))
        if self.out_hadamard and (self.rotation == "none" or not self.online):
            raise RotgraphError(
                f"the online Hadamard before o_proj ({setting('out_hadamard')}) comes with a rotation's online "
                f"Hadamards: it needs {setting('rotation', 'quarot')} or learned and {setting('online')}"
            )
        if self.center_activations and (self.activations != "dynamic" or Scheme.parse(self.scheme).act_bits == 16):
            raise RotgraphError(
                f"{setting('center_activations')} moves what the per-token activation quantizers read: it needs quantized "
                f"dynamic activations, not scheme {self.scheme} with {self.activations} activations"
            )
        if self.center_keys and (Scheme.parse(self.scheme).kv_bits is None or self.gqa_cache):
            raise RotgraphError(
                f"{setting('center_keys')} moves the keys rotgraph's KV-cache quantizer reads: it needs a kv scheme and "
                f"rotgraph's cache (the qdq format, or ort with {setting('kv_cache', 'rotgraph')}, the default at kv4), "
                "not GroupQueryAttention's"
            )

    def _check_clip(self, scheme: Scheme) -> None:
        for what, clip in (("activation", self.act_clip), ("KV cache", self.kv_clip)):
            if clip is not None and not 0.0 < clip <= 1.0:
                raise RotgraphError(f"{what} clip ratio {clip}: expected a ratio in (0, 1]")
        if not self.act_clip_search:
            return
        if self.act_clip is not None:
            raise RotgraphError(f"{setting('act_clip')} takes a ratio or `search`, not both")
        if self.activations != "dynamic" or scheme.act_bits not in (4, 8):
            raise RotgraphError(
                f"{setting('act_clip_search')} sets the per-token quantizers of dynamic activations; scheme {self.scheme} "
                f"with {self.activations} activations has none"
            )
        if self.fmt in ORT_FORMATS and scheme.act_bits == 8 and scheme.weight_bits < 16:
            raise RotgraphError(
                f"{setting('act_clip_search')}: in the {self.fmt} format 8-bit activations are quantized by "
                "onnxruntime's MatMulNBits, which has no clip ratio"
            )

    def _check_asymmetric(self, scheme: Scheme) -> None:
        if self.activations != "dynamic" or scheme.act_bits == 16:
            raise RotgraphError(
                f"{setting('act_asymmetric')} sets the grid of dynamic per-token activations (static ones: "
                f"{setting('act_symmetric')})"
            )
        if self.fmt in ORT_FORMATS and scheme.act_bits == 8 and scheme.weight_bits < 16:
            raise RotgraphError(
                f"{setting('act_asymmetric')}: in the {self.fmt} format 8-bit activations are quantized by onnxruntime's "
                "MatMulNBits, which has its own grid"
            )

    def _check_kv_cache(self, scheme: Scheme) -> None:
        if self.kv_cache not in KV_CACHES:
            raise RotgraphError(f"KV cache {self.kv_cache!r}: expected one of {', '.join(KV_CACHES)}")
        if self.kv_cache == "auto" or scheme.kv_bits is None:
            return
        if self.kv_cache == "onnxruntime" and (self.fmt not in ORT_FORMATS or not self.fused_attention):
            raise RotgraphError(
                f"{setting('kv_cache', 'onnxruntime')} lives inside GroupQueryAttention: it needs --format ort or genai "
                f"with onnxruntime's attention ({setting('fused_attention')})"
            )
        if self.kv_cache == "rotgraph" and self.fmt == "genai":
            raise RotgraphError(
                f"onnxruntime-genai holds only GroupQueryAttention's cache: use {setting('kv_cache', 'onnxruntime')}"
            )

    @property
    def wants_out_hadamard(self) -> bool:
        """Whether the rotation inserts the online Hadamard before o_proj (`out_hadamard`, or by default
        with 4-bit activations)."""
        if self.out_hadamard is None:
            return default_out_hadamard(self.rotation, self.online, Scheme.parse(self.scheme))
        return self.out_hadamard and self.rotation != "none" and self.online

    @property
    def calibration_uses(self) -> list[str]:
        """What in this plan reads calibration text (empty: it needs none); the one place that says so."""
        return [
            name
            for name, on in (
                ("GPTQ", self.weights == "gptq"),
                ("SmoothQuant", self.smooth is not None),
                ("static activations", self.activations == "static"),
                ("the onnxruntime KV cache", self.gqa_cache),
                ("the activation clip search", self.act_clip_search),
                ("centered keys", self.center_keys),
                ("centered projection inputs", self.center_activations),
            )
            if on
        ]

    @property
    def gqa_cache(self) -> bool:
        """Whether the KV cache is kept quantized inside onnxruntime's GroupQueryAttention."""
        store = (
            self.kv_cache
            if self.kv_cache != "auto"
            else kv_store(Scheme.parse(self.scheme), self.fmt, self.fused_attention)
        )
        return gqa_cache(Scheme.parse(self.scheme), self.fmt, self.fused_attention, store)

    def _check_standard(self, scheme: Scheme) -> None:
        """Refuse static activations and opsets the format or the scheme cannot have."""
        if self.activations not in ("static", "dynamic"):
            raise RotgraphError(f"activations {self.activations!r}: expected static or dynamic")
        if self.calibration not in STATIC_RANGES:
            raise RotgraphError(f"calibration method {self.calibration!r}: expected one of {', '.join(STATIC_RANGES)}")
        if self.wide_ratio is not None:
            if self.activations != "static" or not self.wide_ratio > 1.0:
                raise RotgraphError(
                    f"{setting('wide_ratio', self.wide_ratio)}: a ratio > 1, for static activations "
                    f"({setting('activations', 'static')})"
                )
            if self.opset is not None and self.opset < INT4_OPSET:
                raise RotgraphError(
                    f"{setting('wide_ratio', self.wide_ratio)}: 16-bit Q/DQ needs opset {INT4_OPSET} or more "
                    f"({setting('opset', INT4_OPSET)}), not {self.opset}"
                )
        if self.fmt != "qdq" and (self.activations == "static" or self.opset is not None):
            raise RotgraphError(
                f"static activations and {setting('opset')} are for the qdq format ({setting('fmt', 'qdq')}), not "
                f"{self.fmt}"
            )
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
                f"{' and '.join(four)} need {setting('opset', INT4_OPSET)} or more, or an 8-bit scheme"
            )
        if self.opset < INT4_OPSET and self.group and scheme.weight_bits < 16:
            raise RotgraphError(
                f"opset {self.opset}: block-wise weight scales ({setting('group', self.group)}) need opset "
                f"{INT4_OPSET}; pass {setting('group', 0)} (per channel)"
            )
        if self.opset < REDUCE_AXES_INPUT_OPSET and scheme.kv_bits == 4 and not static:
            raise RotgraphError(f"opset {self.opset}: the dynamic 4-bit KV cache packs codes with opset-18 bit ops")


def kv_store(scheme: Scheme, fmt: str, fused_attention: bool) -> str:
    """Where a kv scheme's cache lives by default: inside GroupQueryAttention (onnxruntime) for genai (the
    only cache onnxruntime-genai holds) and for kv8 (as good, smaller and faster), rotgraph's per-token codes
    for kv4 in the ort format (better quality; benchmarks/RESULTS.md, genai runs 6 and 11b) and in qdq."""
    if fmt in ORT_FORMATS and fused_attention and (fmt == "genai" or scheme.kv_bits == 8):
        return "onnxruntime"
    return "rotgraph"


def gqa_cache(scheme: Scheme, fmt: str, fused_attention: bool, store: str) -> bool:
    """Whether a kv scheme's cache is kept as codes inside onnxruntime's GroupQueryAttention."""
    return scheme.kv_bits is not None and fmt in ORT_FORMATS and fused_attention and store == "onnxruntime"


def check_opset(opset: int) -> None:
    """Refuse an opset rotgraph cannot write, before any work."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise RotgraphError(
            f"{setting('opset', opset)}: rotgraph writes standard ONNX at opsets {MIN_OPSET} to {MAX_OPSET}"
        )


def default_out_hadamard(rotation: str, online: bool, scheme: Scheme) -> bool:
    """Whether a rotation gets the online Hadamard before o_proj by default: with online Hadamards at 4-bit
    activations (benchmarks/RESULTS.md, "Online Hadamard before o_proj, and asymmetric per-token activations")."""
    return rotation != "none" and online and scheme.act_bits == 4
