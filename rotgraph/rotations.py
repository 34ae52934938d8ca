"""Rotation files: the R1 and per-layer R2 matrices that `rotgraph learn` writes and the rotation
passes fold (safetensors, float64, with rotgraph's metadata), and optionally learned per-channel
scales (`S.<site>.<layer>`, folded by `rotgraph.passes.rotation.scale_channels` after the rotations)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rotgraph.constants import ROTATIONS_FORMAT
from rotgraph.errors import RotgraphError

if TYPE_CHECKING:
    import torch

ORTHOGONALITY_TOLERANCE = 1e-6
# Scale sites: the attention norm's output (Q/K/V rows), the MLP norm's output (gate/up rows), and V's
# output (V columns per KV head, O rows per query head).
SCALE_SITES = ("attn", "mlp", "v")
Scales = dict[tuple[int, str], np.ndarray]  # (layer, site) -> positive per-channel scale s


def save_rotations(path: Path, rotations: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Write the rotations as safetensors (float64) atomically, with rotgraph's metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"format": ROTATIONS_FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    save_file({k: v.contiguous() for k, v in rotations.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise RotgraphError(f"{path}: no such rotations file")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: np.asarray(f.get_tensor(k), dtype=np.float64) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise RotgraphError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != ROTATIONS_FORMAT:
        raise RotgraphError(f"{path}: not a rotgraph rotations file (written by `rotgraph learn`)")
    return tensors


def load_rotations(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """R1 and the per-layer R2s from a `rotgraph learn` file, checked for orthogonality (the rotation
    passes check their sizes against the model)."""
    tensors = {k: v for k, v in _read(path).items() if not k.startswith("S.")}
    layers = len(tensors) - 1
    if set(tensors) != {"R1", *(f"R2.{i}" for i in range(layers))}:
        raise RotgraphError(f"{path}: expected tensors R1, R2.0 ... R2.{layers - 1}, found {sorted(tensors)}")
    for name, r in tensors.items():
        if r.ndim != 2 or r.shape[0] != r.shape[1]:
            raise RotgraphError(f"{path}: {name} is not a square matrix (shape {r.shape})")
        err = float(np.abs(r.T @ r - np.eye(r.shape[0])).max())
        if not err <= ORTHOGONALITY_TOLERANCE:
            raise RotgraphError(f"{path}: {name} is not orthogonal (max |R^T R - I| = {err:.2g})")
    return tensors["R1"], [tensors[f"R2.{i}"] for i in range(layers)]


def scale_name(layer: int, site: str) -> str:
    return f"S.{site}.{layer}"


def load_scales(path: Path) -> Scales:
    """The learned per-channel scales of a rotations file ({} when it has none), checked positive."""
    out: Scales = {}
    for name, s in _read(path).items():
        if not name.startswith("S."):
            continue
        parts = name.split(".")
        if len(parts) != 3 or parts[1] not in SCALE_SITES or not parts[2].isdigit():
            raise RotgraphError(f"{path}: unexpected scale tensor {name} (S.<{'|'.join(SCALE_SITES)}>.<layer>)")
        if s.ndim != 1 or not np.isfinite(s).all() or not (s > 0).all():
            raise RotgraphError(f"{path}: {name} must be a vector of positive finite scales")
        out[int(parts[2]), parts[1]] = s
    return out
