"""The declared pipeline of `rotgraph quantize`: its stages, in order, for a `QuantOptions` plan.

`quantize_stages` lists them (rotation or the canonical form, calibration and SmoothQuant, activations and
KV cache, weights, the format's own rewrites, clean-up); each `Stage` has a name a reader can print and the
passes it runs. `rotgraph.quantize` runs them on a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.calibrate import CLIP_WINDOWS, BlockHessians, CalibratePass, Calibration
from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec
from rotgraph.options import DEFAULT_CONTEXT_LENGTH, ORT_FORMATS, QuantOptions, Scheme, setting
from rotgraph.passes import UntieEmbeddingPass
from rotgraph.passes.calibration.center_activations import CenterActivationsPass
from rotgraph.passes.calibration.key_mean import SubtractKeyMeanPass
from rotgraph.passes.calibration.smooth import SmoothQuantPass
from rotgraph.passes.canonical.split_rotary import SplitRotaryPass
from rotgraph.passes.ort.gqa_kv_cache import CalibrateGqaCachePass, GqaQuantizedCachePass
from rotgraph.passes.ort.group_query_attention import FindFusableAttentionPass, GroupQueryAttentionPass
from rotgraph.passes.ort.pack_gate_up import PackGateUpPass
from rotgraph.passes.ort.pack_qkv import PackQKVPass
from rotgraph.passes.ort.pack_rotary_qkv import PackRotaryQKVPass
from rotgraph.passes.ort.restore_ort_norms import RestoreOrtNormsPass
from rotgraph.passes.ort.rotary_attention import RotaryIntoAttentionPass
from rotgraph.passes.ort.rotary_embedding import RotaryEmbeddingPass
from rotgraph.passes.ort.rotary_hadamard import RotaryHadamardPass
from rotgraph.passes.ort.shared_kv_buffer import SharedKVBufferPass
from rotgraph.passes.qdq.standard_ops import StandardOpsPass
from rotgraph.passes.quantization.quantize_activations import QuantizeActivationsPass
from rotgraph.passes.quantization.quantize_kv import QuantizeKVCachePass
from rotgraph.passes.quantization.quantize_weights import QuantizeWeightsPass
from rotgraph.passes.quantization.static_activations import CalibrateActivationsPass, StaticActivationsPass, StaticSpec
from rotgraph.pipeline import (
    RotateOptions,
    canonical_form_passes,
    rotation_passes,
)
from rotgraph.quant import WeightSpec


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
    searched: Calibration | None = None,
    act_symmetric: bool = True,
) -> list[ir.passes.PassBase]:
    """The FakeQuant passes of `scheme`: per-token activations (symmetric unless `act_symmetric` is off,
    clip 0.9 at 4 bits unless given, or per input from `searched.clips`, the clip search's result; none
    at 8 bits with `skip_int8`, where the runtime's int8 kernels quantize) and the KV cache (asymmetric
    per token and head, clip 0.95 at 4 bits unless given; stored as codes where the graph has cache
    inputs, unless `store_cache` is off)."""
    passes: list[ir.passes.PassBase] = []
    act = activation_spec(scheme, act_clip, act_symmetric)
    if act is not None and (act.bits == 4 or not skip_int8):
        passes.append(QuantizeActivationsPass(act, searched))
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

    `calibration` holds the calibration windows and receives what the calibration stages measure (None:
    no calibration text; the stages get an empty `Calibration` for what they find); with `calibrated`, it
    already holds the GPTQ statistics (an earlier run on the same model) and that stage is left out.
    Passes hand each other results only through that one object, and a reader's `requires` refuses to
    run before its producer. `scratch` is where weights computed in memory go (see `rotgraph.probe`) and
    where quantized tensors are spilled as they are produced; None keeps everything in memory.
    """
    scheme = Scheme.parse(options.scheme)
    results = calibration if calibration is not None else Calibration()
    stages: list[Stage] = []
    if scheme.kv_bits is not None:  # the cache quantizer (and R3) need the keys after RoPE, outside the op
        stages.append(Stage("RoPE out of fused attention", (SplitRotaryPass(),)))
    if options.rotation != "none":
        stages.append(Stage("rotation", tuple(rotation_passes(rotate_options(options)))))
    else:
        stages.append(Stage("canonical form", tuple(canonical_form_passes())))
    needs_gptq = options.weights == "gptq" and not calibrated and not options.gptq_sequential
    gptq_text = needs_gptq or (options.weights == "gptq" and options.gptq_sequential)
    if (options.smooth is not None or gptq_text or options.act_clip_search) and calibration is None:
        raise RotgraphError("SmoothQuant, GPTQ and the activation clip search need calibration tokens")
    if options.smooth is not None:
        assert calibration is not None
        stages.append(Stage("calibration (activation ranges)", (CalibratePass(calibration, "absmax", scratch),)))
        stages.append(Stage("SmoothQuant", (SmoothQuantPass(calibration, options.smooth),)))
    if options.center_activations:  # before GPTQ and the clip search, which then see centered inputs
        if calibration is None:
            raise RotgraphError(f"{setting('center_activations')} needs calibration tokens")
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
    if fused:  # found before the weights change form (discovery reads MatMul projections)
        stages.append(Stage("find attention to fuse", (FindFusableAttentionPass(results),)))
    static = options.activations == "static"
    act_scheme = dataclasses.replace(scheme, kv_bits=None) if gqa_cache else scheme  # the op quantizes its cache
    searched = None
    if options.act_clip_search:  # after SmoothQuant, which changes the inputs; the weights are still float
        assert calibration is not None
        spec = activation_spec(scheme, symmetric=not options.act_asymmetric)
        stages.append(Stage("calibration (activation clip)", (CalibratePass(calibration, "clip", scratch, spec),)))
        searched = calibration
    act = (
        []
        if static
        else activation_passes(
            act_scheme,
            options.act_clip,
            options.kv_clip,
            skip_int8=ort_int8,
            searched=searched,
            act_symmetric=not options.act_asymmetric,
        )
    )
    if options.center_keys:  # on the float keys, before the cache quantizer reads them
        if calibration is None:
            raise RotgraphError(f"{setting('center_keys')} needs calibration tokens")
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
            calibration if options.weights == "gptq" else None,
            options.damp,
            options.act_order,
            head_spec,
            "ort" if options.fmt == "genai" else options.fmt,
            accuracy_level=4 if ort_int8 else 0,
            spill_dir=scratch,
            shared_head=options.shared_head,
            block_hessians=(
                BlockHessians(calibration.tokens, scratch, sequential=True)
                if options.weights == "gptq" and options.gptq_sequential and calibration is not None
                else None
            ),
        )
        untie = head_spec is not None and not options.shared_head
        stages.append(Stage("weights", (UntieEmbeddingPass(), weights) if untie else (weights,)))
    if fused:
        stages.append(Stage("onnxruntime format", (GroupQueryAttentionPass(results),)))
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
        stages.append(
            Stage(
                "KV cache inside GroupQueryAttention",
                (
                    CalibrateGqaCachePass(calibration, scheme.kv_bits, scratch),
                    GqaQuantizedCachePass(calibration, scheme.kv_bits),
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
    return [
        CalibrateActivationsPass(calibration, spec, kv is not None, scratch, spreads=True),
        StaticActivationsPass(calibration, spec, kv, options.wide_ratio),
    ]
