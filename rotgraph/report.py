"""A visual report of what rotation does to a model: PNG plots and an HTML page that shows them.

Plots (matplotlib, headless): the per-channel magnitude of the residual stream and of down_proj's input
in the layer with the worst outliers, before and after rotation (the outlier picture); per-layer
kurtosis; per-layer quantization error of a scheme (per-token activations at its activation bits, RTN
weights at its weight bits) before and after.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.options import Scheme
from rotgraph.quant import WeightSpec, quantize_rtn
from rotgraph.stages import activation_spec
from rotgraph.stats import ActivationStats, activation_stats
from rotgraph.weights import read_float64

logger = logging.getLogger(__name__)

PLOTS = ("outliers.png", "kurtosis.png", "quant_error.png")


@dataclass(frozen=True)
class Side:
    """One model's numbers in the report."""

    name: str
    activations: list[ActivationStats]
    weight_error: list[float]  # per block: relative squared RTN error over its seven projections


def weight_errors(model_path: Path, spec: WeightSpec) -> list[float]:
    """Per block, ||Q(W) - W||^2 / ||W||^2 over its projections, in the form the quantizer sees them
    (norm scales fused into the weights, as `rotgraph quantize` does before quantizing)."""
    from rotgraph.pipeline import foldable_form_passes, run_passes
    from rotgraph.structure import discover

    model = io.load_model(model_path)
    run_passes(model, foldable_form_passes())
    errors = []
    for block in discover(model).blocks:
        a, m = block.attention, block.mlp
        num = den = 0.0
        for linear in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
            w = read_float64(linear.weight).T  # [out, in]: groups run along the input axis
            num += float(((quantize_rtn(w, spec).dequantize() - w) ** 2).sum())
            den += float((w**2).sum())
        errors.append(num / den)
    return errors


def measure(model_path: Path, tokens: np.ndarray, scheme: Scheme, group: int, scratch: Path | None = None) -> Side:
    act = activation_spec(scheme)
    spec = WeightSpec(scheme.weight_bits, True, group or None) if scheme.weight_bits in (4, 8) else None
    return Side(
        model_path.name,
        activation_stats(model_path, tokens, act, scratch),
        weight_errors(model_path, spec) if spec is not None else [],
    )


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _outlier_plot(path: Path, sides: list[Side], layer: int) -> None:
    plt = _pyplot()

    rows = [("residual stream entering the block", "residual_channel_max"), ("down_proj input", "down_channel_max")]
    fig, axes = plt.subplots(len(rows), len(sides), figsize=(6 * len(sides), 6.5), squeeze=False, sharey="row")
    for r, (title, attr) in enumerate(rows):
        for c, side in enumerate(sides):
            values = getattr(side.activations[layer], attr)
            ax = axes[r][c]
            ax.bar(np.arange(values.size), values, width=1.0, color="C0" if c == 0 else "C1")
            ax.set_title(f"{side.name}: {title}, layer {layer}", fontsize=9)
            ax.set_xlabel("channel")
            ax.set_xlim(0, values.size)
        axes[r][0].set_ylabel("max |activation| over tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_layer_plot(path: Path, sides: list[Side], series: list[tuple[str, str]], ylabel: str, title: str) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c, side in enumerate(sides):
        for k, (label, attr) in enumerate(series):
            values = side.weight_error if attr == "weight_error" else [getattr(s, attr) for s in side.activations]
            if not values or values[0] is None:
                continue
            ax.plot(
                range(len(values)),
                values,
                marker="o",
                color=f"C{c}",
                linestyle=["-", "--", ":"][k],
                label=f"{side.name}: {label}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(sides: list[Side]) -> str:
    head = ["layer"] + [
        f"{side.name}: {col}"
        for side in sides
        for col in ("residual max/RMS", "residual kurtosis", "down_proj in kurtosis")
    ]
    rows = []
    for i in range(len(sides[0].activations)):
        cells = [str(i)]
        for side in sides:
            s = side.activations[i]
            cells += [f"{s.residual_max_over_rms:.1f}", f"{s.residual_kurtosis:.1f}", f"{s.down_kurtosis:.1f}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _page(sides: list[Side], scheme: str, windows: int, seq_len: int, layer: int) -> str:
    names = " vs ".join(html.escape(s.name) for s in sides)
    figures = "".join(
        f'<figure><a href="{p}"><img src="{p}" alt="{p}"></a><figcaption>{c}</figcaption></figure>'
        for p, c in zip(
            PLOTS,
            (
                f"Per-channel max |activation| in layer {layer} (the layer with the largest residual max/RMS).",
                "Per-layer kurtosis over channels, averaged over tokens (3 for a Gaussian).",
                f"Per-layer relative squared quantization error for {html.escape(scheme)}.",
            ),
            strict=True,
        )
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rotgraph report: {names}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}img{{max-width:100%;border:1px solid #ccc}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}
figure{{margin:2em 0}}</style></head>
<body><h1>rotgraph report</h1>
<p>Models: {names}. Statistics on {windows} windows of {seq_len} tokens; scheme {html.escape(scheme)}.</p>
{figures}
<h2>Per-layer statistics</h2>{_table(sides)}
</body></html>
"""


def write_report(
    output: Path,
    model: Path,
    tokens: np.ndarray,
    rotated: Path | None = None,
    scheme: str = "w4a4",
    group: int = 32,
) -> Path:
    """Write PLOTS and index.html into the folder `output` (replaced as a whole, never left half-written);
    returns the index page."""
    parsed = Scheme.parse(scheme)
    if output.exists() and (not output.is_dir() or any(f.name not in {*PLOTS, "index.html"} for f in output.iterdir())):
        raise RotgraphError(f"{output}: exists and is not a rotgraph report folder; choose another output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        scratch = staged / "scratch"  # weights rewritten in memory, if any (removed before the move)
        sides = [measure(model, tokens, parsed, group, scratch / "model")]
        if rotated is not None:
            sides.append(measure(rotated, tokens, parsed, group, scratch / "rotated"))
        shutil.rmtree(scratch, ignore_errors=True)
        layer = int(np.argmax([s.residual_max_over_rms for s in sides[0].activations]))
        _outlier_plot(staged / PLOTS[0], sides, layer)
        kurtosis = [("residual stream", "residual_kurtosis"), ("down_proj input", "down_kurtosis")]
        _per_layer_plot(staged / PLOTS[1], sides, kurtosis, "kurtosis", "Kurtosis per layer")
        errors = [
            (f"activations a{parsed.act_bits}, residual", "residual_quant_error"),
            (f"activations a{parsed.act_bits}, down_proj in", "down_quant_error"),
            (f"weights w{parsed.weight_bits} RTN g{group}", "weight_error"),
        ]
        _per_layer_plot(staged / PLOTS[2], sides, errors, "||Q(x) - x||^2 / ||x||^2", f"Quantization error, {scheme}")
        (staged / "index.html").write_text(
            _page(sides, scheme, tokens.shape[0], tokens.shape[1], layer), encoding="utf-8"
        )
        if output.exists():
            shutil.rmtree(output)
        os.replace(staged, output)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    logger.info("report written to %s", output / "index.html")
    return output / "index.html"
