"""What the pipeline's measuring stages hand to the stages after them: one typed object, `Calibration`.

`quantize_stages` creates one `Calibration` (the calibration windows) and gives it to every pass that
produces or reads a result. A producer sets its field; a reader declares the field in its `requires`
(`Calibration.need`), so a pass list that runs a reader before its producer fails with
`ir.passes.PreconditionError` naming both, instead of reading an empty container. Statistics are keyed
by structural site (`Site`: block index and "qkv" | "o" | "gate_up" | "down", or "k" | "v" for the
static cache sites), which survives the rewrites between producer and reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx_ir as ir

from rotgraph import grid

if TYPE_CHECKING:
    from rotgraph.calibrate import BlockHessians
    from rotgraph.structure import Attention

Site = tuple[int, str]
T = TypeVar("T")


@dataclass(frozen=True)
class TokenSpread:
    """A projection input over the calibration tokens: its minmax range and the median over tokens of
    each token's max |x| (the range that the bulk of the tokens needs)."""

    lo: float
    hi: float
    median_token: float

    @property
    def spread(self) -> float:
        """max |x| over the median token's max |x|: how much of a per-tensor range the bulk leaves unused."""
        return max(-self.lo, self.hi) / max(self.median_token, grid.EPS)


Ranges = dict[Site, tuple[np.ndarray, np.ndarray]]  # (lo, hi): scalars, or one per KV head
Spreads = dict[Site, TokenSpread]


@dataclass(frozen=True)
class CacheScales:
    """Per layer (graph order of the attention nodes): the key and the value scales, [kv_heads * head_dim]."""

    keys: list[np.ndarray]
    values: list[np.ndarray]


# field -> (what it holds, the pass that produces it)
PRODUCERS = {
    "absmax": ("the per-channel activation maxima", "CalibratePass('absmax')"),
    "hessians": ("the GPTQ Hessians", "CalibratePass('hessian')"),
    "block_hessians": ("the GPTQ Hessians of a model run block by block", "CalibratePass('hessian')"),
    "clips": ("the activation clip ratios", "CalibratePass('clip')"),
    "ranges": ("the static activation ranges", "CalibrateActivationsPass"),
    "spreads": ("the projection inputs' token spreads", "CalibrateActivationsPass"),
    "cache_scales": ("the KV cache scales", "CalibrateGqaCachePass"),
    "attentions": ("the attentions to fuse", "FindFusableAttentionPass"),
}


@dataclass
class Calibration:
    """The calibration windows, and each result a stage produces for later ones (None until produced)."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # [windows, seq_len]
    absmax: dict[Site, np.ndarray] | None = None  # max |x| per channel, float64 (SmoothQuant)
    hessians: dict[Site, np.ndarray] | None = None  # X^T X / tokens, float64 (GPTQ)
    block_hessians: BlockHessians | None = None  # instead of `hessians` on a model run block by block
    clips: dict[Site, float] | None = None  # per-token activation quantizer's clip ratio
    ranges: Ranges | None = None  # static (lo, hi) of each site
    spreads: Spreads | None = None  # each projection input's `TokenSpread`
    cache_scales: CacheScales | None = None  # GroupQueryAttention's static cache scales
    attentions: tuple[Attention, ...] | None = None  # the attentions GroupQueryAttentionPass fuses

    def need(self, value: T | None, name: str, reader: ir.passes.PassBase) -> T:
        """`value` (this object's field `name`), or the `PreconditionError` of `reader` that it is missing."""
        if value is None:
            what, producer = PRODUCERS[name]
            raise ir.passes.PreconditionError(
                f"{type(reader).__name__} needs {what} (Calibration.{name}) from {producer}; run it first"
            )
        return value
