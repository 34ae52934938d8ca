"""Layer-wise rotation learning against the distribution of the activations the rotations act on.

No backward pass through the network: the activations are collected once, by onnxruntime on the
calibration windows (`rotgraph.probe`), from the model in the form R1 folds into (norm scales fused):
- R1 (hidden x hidden) rotates the residual stream; what gets quantized are the normalized streams
  read by Q/K/V and by gate/up. Weightless RMSNorm commutes with R1, so these inputs, rotated by R1,
  are what the rotated model quantizes; all layers' inputs are pooled, because one R1 serves them all.
- R2 of each layer (head_dim x head_dim) rotates V's output per KV head, what the KV cache stores and
  (mixed over positions) O reads. V's outputs do not depend on R1 (R1^T folds into V's rows), so each
  layer's R2 is learned on its own.

Objective "kurtosis" (after KurTail): the mean over vectors of the kurtosis E[y^4] / E[y^2]^2 of each
quantized vector y: per token across the hidden channels for R1, per token and KV head across
head_dim for R2 (the quantizers' groups). A per-token absmax quantizer's step is set by max |y|; a
heavy tail (large kurtosis) makes that step large against the typical value. Kurtosis is scale-free,
so every token counts alike, whatever its norm. Rotations start from QuaRot's seeded Hadamards and
follow Cayley SGD (`rotgraph.learning.loop`), so they stay orthogonal and fold like QuaRot's.

Objective "output-error" (after DartQuant's and OSTQuant's point that the quantized layer's output,
not a proxy statistic, is what matters): the relative squared error ||Q(x R) Q(R^T W) - x W||^2 /
||x W||^2 of each linear layer the rotations feed, with the scheme's own fake quantizers (per-token
activations, RTN weights in groups, straight-through rounding; w16 schemes keep the weights float).
R1: every layer's Q/K/V and gate/up inputs against their weights; R2: V's output, quantized per token
and head as the KV cache stores it, expanded to the query heads and quantized per token as O reads it,
against O's rows (a proxy: O reads attention-weighted sums of V's rows, not the rows themselves). Each
step draws `OUTPUT_COLUMNS` output columns per layer (seeded by step, so resuming draws the same), which
keeps a step at a few GFLOP however wide the MLP is.

Scaling (`scaling`, after OSTQuant's scaling matrices): with the rotations learned, positive
per-channel scales s per site (each norm's output, V's output) divide the activations and multiply
the weight rows that read them (folded exactly: `rotgraph.passes.rotation.scale_channels`). Learned by Adam on
log s against the rotations' objective: "kurtosis", that of the scaled activations plus that of the
scaled weights along their quantization axis (each output column's input rows), so the outliers are
split between the two sides instead of all being pushed into the weights; "output-error", the same
output error as the rotations', with x / s quantized and s W's rows.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.learning.loop import Rotations, Stage
from rotgraph.learning.quantizers import Quantizers, fake_quant
from rotgraph.online import factors_for
from rotgraph.pipeline import foldable_form_passes, run_passes
from rotgraph.probe import probe
from rotgraph.rotations import Scales, scale_name
from rotgraph.structure import Attention, ModelDescription, discover, distinct, r2_pairs
from rotgraph.weights import read_float64

logger = logging.getLogger(__name__)

OBJECTIVES = ("kurtosis", "output-error")
OUTPUT_COLUMNS = 256  # output-error: output columns drawn per layer and step
SCALE_LR = 0.05  # scaling: Adam's learning rate on log s


def relative_error(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (rows) of ||y_hat - y||^2 / ||y||^2: every token counts alike, whatever its norm
    (a few massive-activation tokens would otherwise be the whole sum)."""
    return ((y_hat - y).pow(2).sum(-1) / (y.pow(2).sum(-1) + 1e-12)).mean()


def per_query_head(v: torch.Tensor, heads: int) -> torch.Tensor:
    """V's rows per KV head [tokens, kv_heads, d] as O reads them, [tokens, heads * d]: query head j
    reads KV head j // (heads // kv_heads)."""
    tokens, kv_heads, d = v.shape
    return v[:, :, None, :].expand(tokens, kv_heads, heads // kv_heads, d).reshape(tokens, heads * d)


def kurtosis(y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """E[y^4] / E[y^2]^2 of each vector along the last axis (3 for a Gaussian, 1.8 uniform, >= 1)."""
    m2 = y.pow(2).mean(-1)
    return y.pow(4).mean(-1) / (m2.pow(2) + eps)


@dataclass
class SiteActivations:
    """Sampled activations of one layer (float32 rows): the two normalized streams R1 rotates (their
    reader weights beside them, for scaling) and V's output [tokens, kv_heads, head_dim]."""

    attn: torch.Tensor
    mlp: torch.Tensor
    v: torch.Tensor
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # "attn" / "mlp" readers [hidden, out], "o"


def _rows(linears: list) -> np.ndarray:
    return np.concatenate([read_float64(lin.weight) for lin in distinct(linears)], axis=1)


def _v_output(x: np.ndarray, a: Attention) -> np.ndarray:
    """V's output for the attention inputs `x`, per KV head: [tokens, kv_heads, head_dim]."""
    w = read_float64(a.v.weight)
    b = read_float64(a.v.bias) if a.v.bias is not None else None
    if a.v.columns is not None:
        w = w[:, a.v.columns[0] : a.v.columns[1]]
        b = b[a.v.columns[0] : a.v.columns[1]] if b is not None else None
    out = x.astype(np.float64) @ w + (b if b is not None else 0.0)
    return out.reshape(x.shape[0], a.num_kv_heads, a.head_dim).astype(np.float32)


def collect(
    model: ir.Model, token_windows: np.ndarray, site_tokens: int, seed: int, scratch: Path
) -> tuple[ModelDescription, list[SiteActivations]]:
    """Bring `model` to the foldable form (in place) and sample `site_tokens` rows per site from the
    calibration windows, spread evenly over them (seeded); V's outputs are computed from the sampled
    attention inputs and V's weight."""
    run_passes(model, foldable_form_passes())
    desc = discover(model)
    values = [v for b in desc.blocks for v in (b.attention.q.input, b.mlp.gate.input)]
    per_window = -(-site_tokens // len(token_windows))
    rng = np.random.default_rng([seed, 5])
    rows = token_windows.shape[1]  # one window per run: [1, seq, channels] -> seq rows
    picks = [np.sort(rng.choice(rows, size=min(per_window, rows), replace=False)) for _ in token_windows]
    parts: list[list[np.ndarray]] = [[] for _ in values]
    for p in probe(model, values, token_windows, scratch=scratch, optimization="basic", what="collect", progress=True):
        parts[p.value].append(np.asarray(p.array, dtype=np.float32).reshape(rows, -1)[picks[p.window]])
    layers = []
    for i, block in enumerate(desc.blocks):
        attn = np.concatenate(parts[2 * i])[:site_tokens]
        mlp = np.concatenate(parts[2 * i + 1])[:site_tokens]
        a, m = block.attention, block.mlp
        weights = {
            "attn": torch.from_numpy(_rows([a.q, a.k, a.v]).astype(np.float32)),
            "mlp": torch.from_numpy(_rows([m.gate, m.up]).astype(np.float32)),
            "o": torch.from_numpy(read_float64(a.o.weight).astype(np.float32)),
        }
        v = torch.from_numpy(_v_output(attn, a))
        layers.append(SiteActivations(torch.from_numpy(attn), torch.from_numpy(mlp), v, weights))
    logger.info("collected %d tokens per site in %d layers", layers[0].attn.shape[0], len(layers))
    return desc, layers


class LayerwiseObjective(Rotations):
    """R1, the R2s and (optionally) the log-scales, with the objectives of the module doc."""

    def __init__(
        self,
        desc: ModelDescription,
        layers: list[SiteActivations],
        seed: int,
        scaling: bool,
        objective: str = "kurtosis",
        quantizers: Quantizers | None = None,
        center: bool = False,
    ) -> None:
        if objective not in OBJECTIVES:
            raise RotgraphError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if objective == "output-error" and quantizers is None:
            raise RotgraphError("the output-error objective needs the scheme's quantizers")
        if center and (objective != "output-error" or scaling):
            raise RotgraphError("centered inputs are modelled by the output-error objective, without scaling")
        pairs = r2_pairs(desc)
        super().__init__(desc.hidden_size, pairs[0].head_dim, len(layers), seed)
        self.objective, self.quantizers, self.seed = objective, quantizers, seed
        # output-error: each quantized input's mean (over the sampled rows) is subtracted before its
        # quantizer and added back through the float weight, as `quantize --set activations.center=true` does
        self.means = [{site: getattr(x, site).mean(0) for site in ("attn", "mlp")} for x in layers] if center else None
        self.layers = layers
        self.heads = [(p.num_heads, p.num_kv_heads, p.head_dim) for p in pairs]
        self.log_s = torch.nn.ParameterDict()
        if scaling:
            for i, x in enumerate(layers):
                self.log_s[f"attn{i}"] = torch.nn.Parameter(torch.zeros(x.attn.shape[1], dtype=torch.float64))
                self.log_s[f"mlp{i}"] = torch.nn.Parameter(torch.zeros(x.mlp.shape[1], dtype=torch.float64))
                self.log_s[f"v{i}"] = torch.nn.Parameter(torch.zeros(x.v.shape[1] * x.v.shape[2], dtype=torch.float64))
        self._rotated: list[dict[str, torch.Tensor]] | None = None

    def later_stages(self, steps: int) -> list[Stage]:
        """With scaling, `steps` Adam steps on the log-scales against `scale_loss`, the rotations fixed."""
        if not len(self.log_s):
            return []
        return [Stage(self.scale_loss, torch.optim.Adam(self.log_s.parameters(), lr=SCALE_LR), steps)]

    def rotation_loss(self, step: int = 0) -> torch.Tensor:
        """The objective of R1 and the R2s (the module doc); `step` draws output-error's columns."""
        if self.objective == "output-error":
            return self.output_error(step)
        return self.kurtosis_loss()

    def output_error(self, step: int) -> torch.Tensor:
        """Mean relative output error of the quantized Q/K/V and gate/up layers (R1) plus that of O
        reading V's quantized rotated rows (R2), on `OUTPUT_COLUMNS` columns per layer drawn for `step`."""
        assert self.quantizers is not None
        quant = self.quantizers
        rng = np.random.default_rng([self.seed, 11, step])
        r1 = self.r1.to(torch.float32)
        r1_loss = torch.zeros((), dtype=torch.float32)
        r2_loss = torch.zeros((), dtype=torch.float32)
        for i, (x, r2, (heads, _, d)) in enumerate(zip(self.layers, self.r2, self.heads, strict=True)):
            for site in ("attn", "mlp"):
                act, w = getattr(x, site), x.weights[site]
                cols = torch.from_numpy(rng.choice(w.shape[1], min(OUTPUT_COLUMNS, w.shape[1]), replace=False))
                w = w[:, cols]
                if self.means is None:
                    y_hat = quant.activations(act @ r1) @ quant.weights(r1.T @ w)
                else:
                    mean = self.means[i][site]
                    y_hat = quant.activations((act - mean) @ r1) @ quant.weights(r1.T @ w) + mean @ w
                r1_loss = r1_loss + relative_error(y_hat, act @ w)
            h = r2.to(torch.float32)
            o = x.weights["o"]
            cols = torch.from_numpy(rng.choice(o.shape[1], min(OUTPUT_COLUMNS, o.shape[1]), replace=False))
            o = o[:, cols].reshape(heads, d, -1)
            v = x.v @ h  # [tokens, kv_heads, d], what the cache stores
            if quant.kv is not None:
                v = fake_quant(v, quant.kv)
            z = per_query_head(v, heads)
            y_hat = quant.o_projection(z, (h.T @ o).reshape(heads * d, -1), center=self.means is not None)
            y = per_query_head(x.v, heads)
            r2_loss = r2_loss + relative_error(y_hat, y @ o.reshape(heads * d, -1))
        return r1_loss / (2 * len(self.layers)) + r2_loss / len(self.layers)

    def kurtosis_loss(self) -> torch.Tensor:
        """Mean kurtosis of the rotated normalized streams (all layers) plus, per layer, that of V's
        rotated head vectors."""
        r1 = self.r1.to(torch.float32)
        streams = torch.cat([torch.cat([x.attn, x.mlp]) for x in self.layers])
        loss = kurtosis(streams @ r1).mean()
        for x, r2 in zip(self.layers, self.r2, strict=True):
            loss = loss + kurtosis(x.v @ r2.to(torch.float32)).mean() / len(self.layers)
        return loss

    def _rotated_sites(self) -> list[dict[str, torch.Tensor]]:
        """Activations and weights in the learned rotations' basis (computed once the rotations are fixed)."""
        if self._rotated is None:
            r1 = self.r1.detach().to(torch.float32)
            out: list[dict[str, torch.Tensor]] = []
            for x, r2 in zip(self.layers, self.r2, strict=True):
                h = r2.detach().to(torch.float32)
                heads, _, d = self.heads[len(out)]
                o = x.weights["o"].reshape(heads, d, -1)
                out.append(
                    {
                        "attn": x.attn @ r1,
                        "attn_w": r1.T @ x.weights["attn"],
                        "mlp": x.mlp @ r1,
                        "mlp_w": r1.T @ x.weights["mlp"],
                        "v": (x.v @ h).reshape(x.v.shape[0], -1),
                        "v_w": (h.T @ o).reshape(heads * d, -1),
                    }
                )
            self._rotated = out
        return self._rotated

    def _scales(self, i: int, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales of `site` in layer `i` and the weight rows they multiply (O's rows per query head
        for "v", which the scales of each KV head's channels reach through every query head reading it)."""
        s = self.log_s[f"{site}{i}"].exp().to(torch.float32)
        if site != "v":
            return s, s
        heads, kv_heads, d = self.heads[i]
        return s, s.reshape(kv_heads, 1, d).expand(kv_heads, heads // kv_heads, d).reshape(-1)

    def scale_loss(self, step: int = 0) -> torch.Tensor:
        """The scales' objective: the output error of the scaled, quantized layers (objective
        "output-error", columns drawn for `step`) or the kurtosis of the scaled activations and weights."""
        if self.objective == "output-error":
            return self.scaled_output_error(step)
        return self.scaled_kurtosis()

    def scaled_output_error(self, step: int) -> torch.Tensor:
        """Mean relative output error of each site's readers, as in `output_error`, with the learned
        rotations fixed and the activations divided by the scales, the weight rows multiplied by them."""
        assert self.quantizers is not None
        quant = self.quantizers
        rng = np.random.default_rng([self.seed, 13, step])
        total = torch.zeros((), dtype=torch.float32)
        sites = self._rotated_sites()
        for i, rot in enumerate(sites):
            for site in ("attn", "mlp", "v"):
                s, s_rows = self._scales(i, site)
                w = rot[f"{site}_w"]
                cols = torch.from_numpy(rng.choice(w.shape[1], min(OUTPUT_COLUMNS, w.shape[1]), replace=False))
                w = w[:, cols]
                act = rot[site]
                if site == "v":
                    heads, kv_heads, d = self.heads[i]
                    v = (act / s).reshape(-1, kv_heads, d)
                    if quant.kv is not None:
                        v = fake_quant(v, quant.kv)
                    z = per_query_head(v, heads)
                    y = per_query_head(act.reshape(-1, kv_heads, d), heads) @ w
                    y_hat = quant.o_projection(z, w * s_rows[:, None])
                else:
                    z, y = act / s, act @ w
                    y_hat = quant.activations(z) @ quant.weights(w * s_rows[:, None])
                total = total + relative_error(y_hat, y) / (3 * len(sites))
        return total

    def scaled_kurtosis(self) -> torch.Tensor:
        """Kurtosis of the scaled activations (per token) plus that of the scaled weights (per output
        column, along the input rows that the weight quantizer groups), averaged over sites."""
        total = torch.zeros((), dtype=torch.float32)
        sites = self._rotated_sites()
        for i, rot in enumerate(sites):
            for site in ("attn", "mlp", "v"):
                s, s_rows = self._scales(i, site)
                act = kurtosis(rot[site] / s).mean()
                weight = kurtosis((rot[f"{site}_w"] * s_rows[:, None]).T).mean()
                total = total + (act + weight) / (3 * len(sites))
        return total

    def scales(self) -> Scales:
        out: Scales = {}
        for i in range(len(self.layers)):
            if f"attn{i}" in self.log_s:
                for site in ("attn", "mlp", "v"):
                    out[i, site] = self.log_s[f"{site}{i}"].detach().exp().numpy()
        return out


def layerwise_objective(
    model_path: Path,
    token_windows: np.ndarray,
    *,
    site_tokens: int,
    seed: int,
    scaling: bool,
    objective: str,
    quantizers: Quantizers | None,
    out_hadamard: bool = False,
    center: bool = False,
    scratch: Path,
) -> LayerwiseObjective:
    """The objective on activations collected from the model at `model_path` (`collect`, in a temporary
    folder under `scratch`); output-error needs the scheme's `quantizers`, with `out_hadamard` O's online
    Hadamard added to them, with `center` the inputs centered as `quantize --set activations.center=true` does."""
    model = io.load_model(model_path)
    with tempfile.TemporaryDirectory(prefix=".rotgraph-learn.", dir=scratch) as folder:
        desc, layers = collect(model, token_windows, site_tokens, seed, Path(folder))
    del model
    if out_hadamard and quantizers is not None:  # the transform `InsertOutHadamardPass` inserts, as a matrix
        n = desc.blocks[0].attention.o.shape[0]
        h = factors_for(n, "the Hadamard before o_proj").apply(np.eye(n))
        quantizers = dataclasses.replace(quantizers, out_hadamard=torch.from_numpy(h.astype(np.float32)))
    return LayerwiseObjective(desc, layers, seed, scaling, objective, quantizers, center)


def scale_tensors(scales: Scales) -> dict[str, torch.Tensor]:
    """The scales as rotation-file tensors (`rotgraph.rotations.load_scales` reads them)."""
    return {scale_name(i, site): torch.from_numpy(np.asarray(s, dtype=np.float64)) for (i, site), s in scales.items()}
