"""Give a tied lm_head its own weight initializer, and find the map that lets a rotated pair share one table again."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.structure import discover, transposed_initializer
from rotgraph.weights import lazy_from, new_initializer, transposing

logger = logging.getLogger(__name__)


@transposing
def _transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


class UntieEmbeddingPass(ir.passes.InPlacePass):
    """MatMul(x, Transpose(E))  ->  MatMul(x, W_lm) with a new initializer W_lm = E^T; and the other way
    round, Gather(Transpose(W_lm), ids) (onnxruntime-genai's builder)  ->  Gather(E, ids) with a new
    initializer E = W_lm^T.

    In the first form the embedding Gather keeps E, in the second lm_head keeps W_lm. Guarantees: the function is unchanged; afterwards the embedding and
    lm_head weights can be rewritten independently (R1 rotates E on its columns, W_lm on its rows,
    and the final norm scale lands on W_lm only). A model whose lm_head has its own weight is left as is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        if not desc.lm_head_tied:
            return ir.passes.PassResult(model, False)
        table = desc.embedding_table
        vocab, hidden = desc.vocab_size, desc.hidden_size
        source = transposed_initializer(table)
        if source is not None:  # Gather(Transpose(W_lm)): the embedding gets its own table
            embedding = new_initializer(
                model.graph, "embedding.weight", lazy_from(source, _transpose, (vocab, hidden), "embedding.weight")
            )
            desc.embedding.replace_input_with(0, embedding)
            producer = table.producer()
            if producer is not None and not table.uses():
                model.graph.remove(producer, safe=True)
            logger.info("untied the embedding table from lm_head (%d x %d)", vocab, hidden)
            return ir.passes.PassResult(model, True)
        tensor = lazy_from(table, _transpose, (hidden, vocab), "lm_head.weight")
        weight = new_initializer(model.graph, "lm_head.weight", tensor)
        old = desc.lm_head.weight
        desc.lm_head.node.replace_input_with(1, weight)
        producer = old.producer()
        if producer is not None and not old.uses():
            model.graph.remove(producer, safe=True)
        logger.info("untied lm_head from the embedding table (%d x %d)", vocab, hidden)
        return ir.passes.PassResult(model, True)


def map_tolerance(dtype: ir.DataType | None) -> float:
    """The relative residual `embedding_map` allows for weights stored in `dtype`: 1e-5, or 4 units of its
    precision where that is coarser (a rotated float16 pair, each side rounded once, leaves ~3e-4, bfloat16
    ~10x that; an lm_head of its own leaves a residual near 1)."""
    eps = float(ml_dtypes.finfo(dtype.numpy()).eps) if dtype is not None and dtype.is_floating_point() else 0.0
    return max(1e-5, 4 * eps)


def embedding_map(table: np.ndarray, weight: np.ndarray, tolerance: float = 1e-5) -> np.ndarray:
    """M [hidden, hidden] with `weight` = M @ table^T, fitted by float64 least squares, for an lm_head weight
    [hidden, vocab] and the embedding table [vocab, hidden]: what lets a rotated model share one table again.

    After R1 and the fused final norm scale g, a tied pair reads E Q (embedding) and Q^T diag(g) E^T
    (lm_head), so lm_head = M (E Q)^T with M = Q^T diag(g) Q, found here from the two weights alone (any
    rotation, seeded or learned). Raises RotgraphError when `weight` is no such map of the table (relative
    residual above `tolerance`, by the weights' dtype: `map_tolerance`; float32 rounding leaves ~1e-7): an lm_head of its own cannot share it.
    """
    gram = table.T @ table
    try:
        mix = np.linalg.solve(gram, table.T @ weight.T).T
    except np.linalg.LinAlgError:
        raise RotgraphError("the embedding table has dependent columns: it cannot be shared with lm_head") from None
    residual = float(np.linalg.norm(weight - mix @ table.T)) / max(float(np.linalg.norm(weight)), 1e-300)
    if not residual <= tolerance:
        raise RotgraphError(
            f"lm_head is not a linear map of the embedding table (relative residual {residual:.2g} > {tolerance:g}): "
            "a shared (tied) head needs a model whose embeddings were tied"
        )
    return mix
