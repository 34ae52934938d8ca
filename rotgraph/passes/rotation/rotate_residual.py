"""R1: rotate the residual stream by an orthogonal matrix folded into the weights."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import R1_KEY
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.hadamard import Matrix, dense, random_rotation
from rotgraph.structure import discover, r1_readers, r1_writers
from rotgraph.weights import multiply_left, multiply_right, read_float64, rewrite_initializer

logger = logging.getLogger(__name__)


def residual_rotation_factored(n: int, seed: int) -> tuple[Matrix, str]:
    """QuaRot's R1 for hidden size n: a randomized Hadamard from `default_rng([seed, 1])` (factored, so
    the folds run as fast transforms), and its kind."""
    return random_rotation(n, np.random.default_rng([seed, 1]), what="R1")


def residual_rotation(n: int, seed: int) -> tuple[np.ndarray, str]:
    """The same R1 as a dense matrix (the learners' starting point)."""
    q, kind = residual_rotation_factored(n, seed)
    return dense(q), kind


class RotateResidualPass(ir.passes.InPlacePass):
    """Residual stream x -> x Q for an orthogonal Q (hidden x hidden), folded into the weights.

    Rewrites the embedding table E -> E Q, every residual writer (o_proj, down_proj: W -> W Q, bias b ->
    b Q) and every residual reader (q/k/v, gate/up, lm_head: W -> Q^T W), as `rotgraph.structure.folds`
    lists them. Q is `rotation` when given, else a randomized Hadamard matrix drawn from
    `numpy.random.default_rng([seed, 1])` (a seeded random orthogonal matrix where no Hadamard of that
    order is known). Requires weightless norms (`FuseNormScalesPass`) and an untied lm_head:
    RMSNorm(x Q) = RMSNorm(x) Q only without scales.
    Guarantees: exact in real arithmetic; one float32 rounding per weight.
    """

    def __init__(self, seed: int = 0, rotation: np.ndarray | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.rotation = rotation

    def requires(self, model: ir.Model) -> None:
        desc = discover(model)
        for norm in desc.norms():
            if not np.all(read_float64(norm.scale) == 1.0):
                raise StructureError(f"norm {norm.node.name!r} still has a scale: run FuseNormScalesPass first")
        if desc.lm_head_tied:
            raise StructureError("lm_head is tied to the embedding: run UntieEmbeddingPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        n = desc.hidden_size
        q: Matrix
        if self.rotation is not None:
            if self.rotation.shape != (n, n):
                raise RotgraphError(f"R1 must be {n} x {n} for this model, got {self.rotation.shape}")
            q, kind = np.asarray(self.rotation, dtype=np.float64), "given"
        else:
            q, kind = residual_rotation_factored(n, self.seed)
        rewrite_initializer(desc.embedding_table, functools.partial(multiply_right, m=q))
        readers, writers = r1_readers(desc), r1_writers(desc)
        for lin in readers:
            rewrite_initializer(lin.weight, functools.partial(multiply_left, m=q.T))
        for lin in writers:
            rewrite_initializer(lin.weight, functools.partial(multiply_right, m=q))
            if lin.bias is not None:
                rewrite_initializer(lin.bias, functools.partial(multiply_right, m=q))
        model.metadata_props[R1_KEY] = json.dumps({"kind": kind, "size": n, "seed": self.seed})
        logger.info(
            "R1 (%s, %d): %d readers, %d writers and the embedding rotated", kind, n, len(readers), len(writers)
        )
        return ir.passes.PassResult(model, True)  # the embedding table is always rotated (discover finds it or raises)
