"""Give back onnxruntime's fused norms to a graph that came with them."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from rotgraph.constants import ORT_NORMS_KEY

logger = logging.getLogger(__name__)


class RestoreOrtNormsPass(ir.passes.InPlacePass):
    """RMSNormalization -> SimplifiedLayerNormalization, and Add + SimplifiedLayerNormalization ->
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

        graph = model.graph
        simplified = 0
        for node in list(graph):
            if node.op_type != "RMSNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            attrs = [
                ir.AttrInt64("axis", node.attributes.get_int("axis", -1)),
                ir.AttrFloat32("epsilon", node.attributes.get_float("epsilon", 1e-5)),
                ir.AttrInt64("stash_type", 1),
            ]
            # onnxruntime registers SimplifiedLayerNormalization in the default domain (its builder writes it so)
            fused = ir.Node("", "SimplifiedLayerNormalization", list(node.inputs), attrs, name=node.name)
            out, new = node.outputs[0], fused.outputs[0]
            graph.insert_before(node, fused)
            name = out.name
            new.shape, new.type = out.shape, out.type
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            new.name = name
            simplified += 1
        common_passes.ShapeInferencePass(strict_mode=False)(model)  # the skip rule compares widths
        skipped = skip_normalization.fuse_skip_rms_normalization(model)
        model.metadata_props.pop(ORT_NORMS_KEY, None)
        logger.info("restored onnxruntime's norms: %d SkipSimplifiedLayerNormalization, %d in all", skipped, simplified)
        return ir.passes.PassResult(model, simplified > 0)
