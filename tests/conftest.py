"""Shared fixtures: tiny random-weight models exported once per session, and independent references."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rotgraph.evaluate import empty_cache
from rotgraph.export import export
from rotgraph.testing import make_tiny_model


def ort_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime with every graph optimization disabled (the reference setting)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": tokens.astype(np.int64)} | empty_cache(session, tokens.shape[0])
    return np.asarray(session.run(None, feeds)[0])


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)), in nats, computed in float64."""
    p = reference.astype(np.float64) - reference.max(-1, keepdims=True)
    q = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def edited_export(tmp_path: Path, model_type: str, seed: int, edit: Callable[[object], None]) -> Path:
    """A tiny Hugging Face model changed in place by `edit(model)` (under no_grad), exported (dynamo)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(tmp_path / "hf", model_type, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(folder)
    path = tmp_path / "onnx" / "model.onnx"
    export(str(folder), path, "dynamo", False)
    return path


def kl_without_and_with(path: Path, tmp_path: Path, scheme: str, flag: str) -> tuple[float, float]:
    """Mean KL to `path`'s float logits (2 x 256 seeded tokens) of `rotgraph quantize --scheme SCHEME --recipe
    plain` (dynamic activations, 2 calibration windows) without and with `--set FLAG`."""
    from rotgraph.cli import main

    ids = np.random.default_rng(11).integers(0, 384, size=(2, 256))
    reference = ort_logits(path, ids)
    errors = []
    for name, extra in (("without", []), ("with", ["--set", flag])):
        out = tmp_path / name / "model.onnx"
        argv = [
            "quantize",
            str(path),
            "-o",
            str(out),
            "--scheme",
            scheme,
            "--recipe",
            "plain",
            "--activations",
            "dynamic",
        ]
        assert main([*argv, "--set", "calibration.windows=2", *extra]) == 0
        errors.append(mean_kl(reference, ort_logits(out, ids)))
    return errors[0], errors[1]


@pytest.fixture(scope="module")
def tool_venvs() -> None:
    """Fail (not skip) before any work when an exporter tool's venv is missing: CI makes them
    (scripts/test.sh). For the e2e tests that run the tools themselves."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_exporter_fixtures as fixtures

    missing = [t.name for t in fixtures.TOOLS if not fixtures.venv_ready(t)]
    if missing:
        pytest.fail(
            f"tool venvs {missing} under {fixtures.VENVS} are missing or not at their pins; make them with "
            "`.venv/bin/python scripts/make_exporter_fixtures.py --venvs-only` (scripts/test.sh does this "
            "before an e2e run)",
            pytrace=False,
        )


def torch_logits(folder: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of the Hugging Face model itself: the independent reference for every rewrite."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits.numpy()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """tiny(model_type, exporter, with_past=False, **config) -> (hf_folder, exported model.onnx), cached
    per session; the KV-cache export shares the Hugging Face folder of the plain one."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def build(
        model_type: str = "llama", exporter: str = "dynamo", with_past: bool = False, **overrides: object
    ) -> tuple[Path, Path]:
        key = (model_type, exporter, with_past, tuple(sorted(overrides.items())))
        if key not in cache:
            if with_past:
                folder, _ = build(model_type, exporter, **overrides)
                onnx_path = folder.parent / "onnx-past" / "model.onnx"
            else:
                root = tmp_path_factory.mktemp(f"{model_type}-{exporter}")
                folder = make_tiny_model(root / "hf", model_type, **overrides)
                onnx_path = root / "onnx" / "model.onnx"
            export(str(folder), onnx_path, exporter, with_past)  # type: ignore[arg-type]
            cache[key] = (folder, onnx_path)
        return cache[key]

    return build


@pytest.fixture
def model_dir(tiny, tmp_path) -> Path:
    """A copy of the tiny dynamo-exported Llama (model, external data, tokenizer) the test may damage."""
    _, path = tiny("llama", "dynamo")
    folder = tmp_path / "in"
    shutil.copytree(path.parent, folder)
    return folder


@pytest.fixture(scope="session")
def tokens() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 384, size=(2, 24))
