"""Give a tied lm_head its own weight initializer."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from rotgraph.structure import discover
from rotgraph.weights import lazy_from, new_initializer

logger = logging.getLogger(__name__)


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


class UntieEmbeddingPass(ir.passes.InPlacePass):
    """MatMul(x, Transpose(E))  ->  MatMul(x, W_lm) with a new initializer W_lm = E^T.

    The embedding Gather keeps E. Guarantees: the function is unchanged; afterwards the embedding and
    lm_head weights can be rewritten independently (R1 rotates E on its columns, W_lm on its rows,
    and the final norm scale lands on W_lm only). A model whose lm_head has its own weight is left as is.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        if not desc.lm_head_tied:
            return ir.passes.PassResult(model, False)
        table = desc.embedding_table
        vocab, hidden = desc.vocab_size, desc.hidden_size
        tensor = lazy_from(table, _transpose, (hidden, vocab), "lm_head.weight")
        weight = new_initializer(model.graph, "lm_head.weight", tensor)
        old = desc.lm_head.weight
        desc.lm_head.node.replace_input_with(1, weight)
        producer = old.producer()
        if producer is not None and not old.uses():
            model.graph.remove(producer, safe=True)
        logger.info("untied lm_head from the embedding table (%d x %d)", vocab, hidden)
        return ir.passes.PassResult(model, True)
