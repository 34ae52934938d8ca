"""Fold RMSNorm scales into the MatMuls that read the norms."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.errors import StructureError
from rotgraph.structure import discover
from rotgraph.weights import read_float64, rewrite_initializer, scale_rows

logger = logging.getLogger(__name__)


class FuseNormScalesPass(ir.passes.InPlacePass):
    """RMSNorm(x) * g @ W  ->  RMSNorm(x) @ (diag(g) W), leaving every norm with a scale of ones.

    Applies to the two norms of every block and the final norm. Biases of the readers are unchanged.
    Guarantees: exact in real arithmetic (float64 products, one rounding per weight); afterwards the
    norms are weightless and hence commute with any orthogonal rotation of the residual stream.
    Requires an untied lm_head (`UntieEmbeddingPass`) when the final norm has a non-trivial scale.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        scales = [(norm, read_float64(norm.scale)) for norm in desc.norms()]
        fused = 0
        for (norm, gamma), readers in zip(scales, desc.norm_readers(), strict=True):
            if np.all(gamma == 1.0):
                continue
            for lin in readers:
                if not lin.weight.is_initializer():
                    raise StructureError(
                        f"norm {norm.node.name!r}: reader {lin.node.name!r} has no own weight initializer "
                        "(a tied lm_head: run UntieEmbeddingPass first)"
                    )
                rewrite_initializer(lin.weight, functools.partial(scale_rows, s=gamma))
            fused += 1
        for norm, gamma in scales:
            if not np.all(gamma == 1.0):
                dtype = norm.scale.dtype or ir.DataType.FLOAT
                norm.scale.const_value = ir.Tensor(np.ones(gamma.shape, dtype=dtype.numpy()), name=norm.scale.name)
        logger.info("fused %d RMSNorm scales into their MatMuls", fused)
        return ir.passes.PassResult(model, fused > 0)
