"""Rotation files: the R1 and per-layer R2 matrices that `rotgraph learn` writes and the rotation
passes fold (safetensors, float64, with rotgraph's metadata)."""

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


def save_rotations(path: Path, rotations: dict[str, torch.Tensor], metadata: dict[str, object]) -> None:
    """Write the rotations as safetensors (float64) atomically, with rotgraph's metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"format": ROTATIONS_FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    save_file({k: v.contiguous() for k, v in rotations.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_rotations(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """R1 and the per-layer R2s from a `rotgraph learn` file, checked for orthogonality (the rotation
    passes check their sizes against the model)."""
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
