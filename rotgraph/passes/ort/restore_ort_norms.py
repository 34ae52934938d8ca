"""Give back onnxruntime's fused norms to a graph that came with them."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern

from rotgraph.constants import ORT_NORMS_KEY

logger = logging.getLogger(__name__)


class _SimplifiedNorm(pattern.RewriteRuleClassBase):
    """RMSNormalization(x, w) -> SimplifiedLayerNormalization(x, w): the same axis and epsilon, in float32
    (stash type 1). The node keeps its name and, as every rewrite does, its output keeps its name, type and
    shape."""

    def pattern(self, op, x, scale):  # type: ignore[no-untyped-def]
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def rewrite(self, op, x, scale, normalized):  # type: ignore[no-untyped-def]
        norm = normalized.producer()
        # onnxruntime registers SimplifiedLayerNormalization in the default domain (its builder writes it so)
        return op.SimplifiedLayerNormalization(
            x,
            scale,
            axis=norm.attributes.get_int("axis", -1),
            epsilon=norm.attributes.get_float("epsilon", 1e-5),
            stash_type=1,
            _name=norm.name,
        )


RULES = pattern.RewriteRuleSet([_SimplifiedNorm.rule()])


class RestoreOrtNormsPass(ir.passes.InPlacePass):
    """RMSNormalization -> SimplifiedLayerNormalization (a rewrite rule), and Add + SimplifiedLayerNormalization ->
    SkipSimplifiedLayerNormalization (onnxscript's onnxruntime fusion rule), in a graph whose input had
    those fused norms (`ExpandOrtFusedOpsPass` recorded them under `ORT_NORMS_KEY`); a graph that had none
    is left as it is.

    The canonical form expands onnxruntime's norms so every pass reads one form; this puts the form back,
    so a graph from onnxruntime-genai's builder or onnxruntime's optimizer drops back into those tools.
    With `always`, the norms are fused whether or not the input had them (the ort and genai formats: the
    leanest graph onnxruntime runs, as its model builder writes it).
    Guarantees: the same function (SimplifiedLayerNormalization computes RMSNormalization's expression, in
    float32 as its stash type), and the residual sums stay readable as the Skip norm's fourth output.
    """

    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.always = always

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if ORT_NORMS_KEY not in model.metadata_props and not self.always:
            return ir.passes.PassResult(model, False)
        from onnxscript.rewriter.ort_fusions import skip_normalization

        simplified = RULES.apply_to_model(model)
        common_passes.ShapeInferencePass(strict_mode=False)(model)  # the skip rule compares widths
        skipped = skip_normalization.fuse_skip_rms_normalization(model)
        model.metadata_props.pop(ORT_NORMS_KEY, None)
        logger.info("restored onnxruntime's norms: %d SkipSimplifiedLayerNormalization, %d in all", skipped, simplified)
        return ir.passes.PassResult(model, simplified > 0)
