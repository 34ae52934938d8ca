"""Pack the gate and up projections of a SwiGLU MLP into one MatMul followed by a Split."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from rotgraph.passes.ort.pack_qkv import Projection, packing, projection, same_kind

logger = logging.getLogger(__name__)


def _width(p: Projection) -> int | None:
    """Output channels of the projection (Split halves the packed output: both must have the same)."""
    if p.node.op_type == "MatMulNBits":
        return p.node.attributes.get_int("N", 0) or None
    weight = p.node.inputs[1]
    shape = weight.shape if weight is not None else None
    return shape[-1] if shape is not None and isinstance(shape[-1], int) else None


def _output(p: Projection) -> ir.Value:
    return (p.bias or p.node).outputs[0]


def _like(new: ir.Value, old: ir.Value) -> ir.Value:
    new.shape, new.type = old.shape, old.type
    return new


class _PackGateUp(pattern.RewriteRuleClassBase):
    """Mul(Mul(g, Sigmoid(g)), u) (any operand order, with the rule set's `commute`), g and u projections of
    one kind of the same input (`pack_qkv.projection`: MatMul by a constant weight or MatMulNBits, either
    with a constant bias Add) of the same width, g read only by the SiLU, u only by the product ->
    Split(packed projection) feeding the same SiLU and product."""

    def setup(self) -> None:
        self._packed = 0  # names gate_up_0, gate_up_1, ... in graph order, as each graph is rewritten

    def pattern(self, op, gate, up):  # type: ignore[no-untyped-def]
        sigmoid = op.Sigmoid(gate, _outputs=["sigmoid"])
        return op.Mul(op.Mul(gate, sigmoid, _outputs=["silu"]), up, _outputs=["product"])

    def check(self, op, gate, up, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        g, u = projection(gate, readers=2), projection(up)
        if g is None:
            return result.fail("the gate is not a projection by constant weights read only by the SiLU", gate)
        if u is None:
            return result.fail("the up value is not a projection by constant weights read only here", up)
        if not same_kind([g, u]):
            return result.fail("gate and up differ in op, input, bias or quantization", [g.node, u.node])
        if _width(g) is None or _width(g) != _width(u):
            return result.fail("gate and up differ in width (or it is unknown)", [g.node, u.node])
        return result

    def rewrite(self, op, gate, up, sigmoid, silu, product):  # type: ignore[no-untyped-def]
        g, u = projection(gate, readers=2), projection(up)
        assert g is not None and u is not None
        name = f"gate_up_{self._packed}"
        self._packed += 1
        packed = packing([g, u])
        inputs = [g.node.inputs[0]]
        for constant in packed.constants:
            if constant is None:
                inputs.append(None)
                continue
            suffix, array = constant
            inputs.append(op.initializer(ir.tensor(array, name=f"{name}.{suffix}")))
        attributes = {a.name: a for a in packed.attributes}
        out = op.op(packed.op_type, *inputs, _domain=packed.domain, _name=name, _outputs=[f"{name}_out"], **attributes)
        if packed.bias is not None:
            bias = op.initializer(ir.tensor(packed.bias, name=f"{name}.bias"))
            out = op.Add(out, bias, _name=f"{name}_bias", _outputs=[f"{name}_biased"])
        olds = [_output(g), _output(u)]
        halves = op.Split(
            out, axis=-1, num_outputs=2, _name=f"{name}_split", _outputs=[f"{old.name}_packed" for old in olds]
        )
        gate_half, up_half = (_like(new, old) for new, old in zip(halves, olds, strict=True))
        # the SiLU and the product again, under their names (their outputs too: the product's is kept by the rewriter)
        s = _like(op.Sigmoid(gate_half, _name=sigmoid.producer().name, _outputs=[sigmoid.name]), sigmoid)
        activated = _like(op.Mul(gate_half, s, _name=silu.producer().name, _outputs=[silu.name]), silu)
        return op.Mul(activated, up_half, _name=product.producer().name)


RULES = pattern.RewriteRuleSet([_PackGateUp.rule()], commute=True)


class PackGateUpPass(ir.passes.InPlacePass):
    """SwiGLU's gate and up projections of one input -> one projection of twice the width + Split.

    Where Mul(SiLU(gate), up) reads two projections of the same input (MatMulNBits with the same K, bits,
    block size and accuracy level, or MatMul by constant weights; both with a constant bias or neither, as
    centered projection inputs (`activations.center`) leave them), their weights (and biases) are concatenated (gate first) into one
    projection whose output a Split halves on the last axis; the SiLU and the product read the halves.
    An onnxscript rewrite rule (`_PackGateUp`); the concatenation is `pack_qkv.packing`, as PackQKVPass's.
    Weights move byte for byte, so the function is the same to float rounding.
    Measured on onnxruntime 1.32 (CPU, 2 threads, SmolLM2's 576 -> 2 x 1536, int4 blocks of 64): one
    packed MatMulNBits + Split takes the MLP's gate/up 1.22x faster at one token, 1.06x at 512.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        packed = RULES.apply_to_model(model)
        if packed:
            RemoveUnusedNodesPass()(model)  # the separate projections and their weights
            logger.info("gate and up packed into one projection in %d MLPs", packed)
        return ir.passes.PassResult(model, packed > 0)
