"""How a quantized model is judged against its float input before it is written.

Two rules, both on the validation windows (`check_against_float`):
- *broken*: non-finite logits, or KL to the float model no better than the float model's own KL between
  unrelated positions (misplaced scales and the like), on any model;
- *far below its recipe*: on real text that the float model predicts (its perplexity there below the
  square root of the vocabulary, so not on random weights or random token ids), top-1 agreement, KL and
  the perplexity ratio against per-activation-width floors (`FLOORS`). The floors sit well outside what
  the recipes measure on the default model (benchmarks/RESULTS.md, "Validation floors"), so that a result
  which fails them is a wrong choice (e.g. static per-tensor 4-bit activations: top-1 0.05), not noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rotgraph.errors import ValidationError
from rotgraph.evaluate import log_softmax, validation_logits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Floor:
    """The least a quantized model must agree with its float model on real text."""

    top1: float  # fraction of positions with the float model's argmax, at least
    kl: float  # mean KL(float || quantized) in nats, at most
    ppl_ratio: float  # perplexity / the float model's, at most


# By activation bits (16: weight-only). Measured by the best recipes on SmolLM2-135M (16 x 512 tokens):
# w4a4kv4 1.51x perplexity, KL ~0.55, top-1 ~0.63; w4a8 1.11x, KL ~0.12, top-1 ~0.82; the plain recipe
# (QuaRot + RTN) w4a4kv4 3.78x / 1.38 / 0.45 and w4a8 1.72x / 0.59 / 0.62 pass; static per-tensor 4-bit
# activations (top-1 0.05, KL 7.5) fail.
FLOORS = {4: Floor(0.35, 2.0, 5.0), 8: Floor(0.5, 1.0, 2.5), 16: Floor(0.5, 1.0, 2.5)}


@dataclass(frozen=True)
class Agreement:
    """How the quantized model's next-token distributions compare with the float model's."""

    kl: float  # mean KL(float || quantized) over positions, nats
    top1: float  # fraction of positions with the same argmax
    unrelated_kl: float  # mean KL(float at t || float at another position): what knowing nothing scores
    float_ppl: float | None = None  # perplexity of the float model on the validation text (None: no text)
    ppl_ratio: float | None = None  # the quantized model's perplexity / the float model's

    def __str__(self) -> str:
        ppl = "" if self.ppl_ratio is None else f", perplexity {self.ppl_ratio:.3f}x float ({self.float_ppl:.2f})"
        return (
            f"KL to float {self.kl:.4f} nats (unrelated positions: {self.unrelated_kl:.4f}), top-1 {self.top1:.3f}{ppl}"
        )


def agreement(reference: np.ndarray, logits: np.ndarray, targets: np.ndarray | None = None) -> Agreement:
    """Compare logits [windows, seq, vocab] of a quantized model with the float model's; with `targets`
    [windows, seq] (the next token at each position, -1 where there is none), also their perplexities."""
    p = log_softmax(reference)
    q = log_softmax(logits)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    shifted = np.roll(p, p.shape[1] // 2, axis=1)  # each position against one half a window away
    unrelated = float((np.exp(p) * (p - shifted)).sum(-1).mean())
    top1 = float((p.argmax(-1) == q.argmax(-1)).mean())
    if targets is None or not (targets >= 0).any():
        return Agreement(kl, top1, unrelated)
    at = targets >= 0
    index = np.where(at, targets, 0)[..., None]
    nll_p = -np.take_along_axis(p, index, -1)[..., 0][at].mean()
    nll_q = -np.take_along_axis(q, index, -1)[..., 0][at].mean()
    return Agreement(kl, top1, unrelated, float(np.exp(nll_p)), float(np.exp(nll_q - nll_p)))


def far_below(found: Agreement, floor: Floor, vocab_size: int) -> list[str]:
    """The figures of `found` that miss `floor` (empty: none, or the float model does not predict the
    validation text, so the floors say nothing)."""
    if found.float_ppl is None or found.ppl_ratio is None or not found.float_ppl < vocab_size**0.5:
        return []
    missed = []
    if found.top1 < floor.top1:
        missed.append(f"top-1 {found.top1:.3f} < {floor.top1}")
    if found.kl > floor.kl:
        missed.append(f"KL {found.kl:.3f} > {floor.kl}")
    if found.ppl_ratio > floor.ppl_ratio:
        missed.append(f"perplexity {found.ppl_ratio:.2f}x float > {floor.ppl_ratio}x")
    return missed


def check_against_float(
    input_path: Path, output: Path, tokens: np.ndarray, floor: Floor, real_text: bool, keep: bool = False
) -> Agreement:
    """Run the float input and the quantized output on `tokens` [windows, seq]; refuse (raise
    ValidationError) a broken output, or one whose figures miss `floor` on real text (with `keep`, only
    warn). Returns the figures."""
    reference, logits = validation_logits(input_path, output, tokens)  # with a left-padded row if it takes one
    if not np.isfinite(logits).all():
        raise ValidationError("the quantized model produces non-finite logits; nothing written")
    targets = None
    if real_text:  # the unpadded windows come first, in order: their next tokens
        windows = tokens.shape[0]
        targets = np.full(reference.shape[:2], -1, dtype=np.int64)
        whole = windows - 1 if windows > 1 and reference.shape[1] < tokens.size else windows
        nexts = np.concatenate([tokens[:whole, 1:], np.full((whole, 1), -1)], axis=1).reshape(-1)
        targets[0, : nexts.size] = nexts
    found = agreement(reference, logits, targets)
    if not found.kl < found.unrelated_kl:
        raise ValidationError(f"the quantized model is broken: {found}; nothing written")
    if missed := far_below(found, floor, reference.shape[-1]):
        message = (
            f"the quantized model is far below what its scheme's recipes reach: {'; '.join(missed)} ({found}). "
            "A plainer recipe or another scheme/format may be the cause"
        )
        if not keep:
            raise ValidationError(f"{message}; nothing written (--keep-failed writes it anyway)")
        logger.warning("WARNING: %s; written anyway (--keep-failed)", message)
    return found
