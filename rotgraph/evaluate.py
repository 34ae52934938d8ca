"""Scoring ONNX language models with onnxruntime: perplexity, KL to a reference, top-1 agreement."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from rotgraph import kernels as rotgraph_kernels
from rotgraph.errors import RotgraphError
from rotgraph.inputs import InputRoles, read_roles

logger = logging.getLogger(__name__)

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class Session(ort.InferenceSession):
    """An onnxruntime session that knows the roles of its model's inputs (`rotgraph.inputs`), read from
    the model on first use, so every caller feeds a model the same way (`model_feeds`)."""

    def __init__(self, source: str | bytes, options: ort.SessionOptions) -> None:
        super().__init__(source, options, providers=["CPUExecutionProvider"])
        self._source: str | bytes | None = source
        self._roles: InputRoles | None = None

    @property
    def roles(self) -> InputRoles:
        if self._roles is None:
            assert self._source is not None
            self._roles = read_roles(self._source if isinstance(self._source, bytes) else Path(self._source))
            self._source = None
        return self._roles


def owned(x: np.ndarray) -> np.ndarray:
    """An onnxruntime output as an array of its own, for a caller that keeps it after the session: the arrays
    a session returns are views of its memory and keep all of it alive (at Llama-3.1-8B widths, validation
    logits held the head's whole session)."""
    return np.array(x, copy=True)


def make_session(
    path: Path | bytes,
    optimization: str = "basic",
    threads: int | None = None,
    kernels: bool | None = None,
    spinning: bool = True,
    external_data_folder: Path | None = None,
) -> Session:
    """An onnxruntime CPU session. `disable` turns off every graph rewrite (the validation setting);
    int4 MatMulNBits fusion never changes accuracy silently: its accuracy level is pinned to 0 (float).
    kernels: rotgraph's compiled kernels for its own ops (`rotgraph.kernels.register`): None uses them when
    they are built, True requires them, False runs the ONNX function bodies. spinning=False stops idle
    intra-op threads from spinning (for several sessions sharing the cores).

    `path` may instead be a serialized model (bytes, run on the function bodies) whose external data lies in
    `external_data_folder`: a probe of a loaded model needs no copy of its weights on disk."""
    options = ort.SessionOptions()
    if isinstance(path, bytes):
        if kernels:
            raise RotgraphError("rotgraph's kernels are registered for model files, not serialized models")
        if external_data_folder is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(external_data_folder)
            )
        source: str | bytes = path
        where = "the serialized model"
    else:
        rotgraph_kernels.register(options, path, kernels)
        source = where = str(path)
    options.graph_optimization_level = _LEVELS[optimization]
    options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 4)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return Session(source, options)
    except Exception as e:
        raise RotgraphError(f"{where}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def roles(session: ort.InferenceSession) -> InputRoles:
    if not isinstance(session, Session):
        raise RotgraphError("the session was not made by rotgraph.evaluate.make_session: its input roles are unknown")
    return session.roles


def empty_cache(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Zero-length KV cache feeds (the prefill of a graph with a KV cache). A session not made by
    `make_session` (tests that build their own) is read by the `past_key_values.*` name convention."""
    if isinstance(session, Session):
        return {c.name: c.empty(batch) for c in session.roles.caches}
    feeds = {}
    for arg in session.get_inputs():
        if not arg.name.startswith(PAST_PREFIX):
            continue
        if arg.type not in _ORT_TYPES or len(arg.shape) != 4:
            raise RotgraphError(f"cache input {arg.name!r}: unsupported type {arg.type} or rank {len(arg.shape)}")
        _, heads, _, width = arg.shape
        if not isinstance(heads, int) or not isinstance(width, int):
            raise RotgraphError(f"cache input {arg.name!r}: expected static heads and width, found {arg.shape}")
        feeds[arg.name] = np.zeros((batch, heads, 0, width), dtype=_ORT_TYPES[arg.type])
    return feeds


def model_feeds(
    session: ort.InferenceSession, tokens: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Feeds for whole sequences from an empty cache: token ids, the attention mask (`mask` [batch, seq],
    1 = real token, 0 = padding; None: all ones) and positions when the graph takes them, empty caches.
    Inputs are found by their role (`rotgraph.inputs`)."""
    return roles(session).feeds(tokens, mask)


def run_logits(session: ort.InferenceSession, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Logits [batch, seq, vocab] (the first output) of whole sequences; `mask` as in `model_feeds`."""
    feeds = model_feeds(session, tokens, mask)
    try:
        return owned(session.run(None, feeds)[0])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        raise RotgraphError(f"onnxruntime failed to run the model: {e}") from None


def windows(ids: Sequence[int], count: int, seq_len: int) -> np.ndarray:
    """`count` evenly spaced non-overlapping windows of `seq_len` tokens, shape [count, seq_len]."""
    available = len(ids) // seq_len
    if count < 1 or seq_len < 2:
        raise RotgraphError("need at least one window of at least 2 tokens")
    if available < count:
        raise RotgraphError(
            f"text too short: {len(ids)} tokens give {available} windows of {seq_len}, {count} requested"
        )
    starts = np.linspace(0, available - 1, count).round().astype(np.int64) * seq_len
    arr = np.asarray(ids, dtype=np.int64)
    return np.stack([arr[s : s + seq_len] for s in starts])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class EvalResult:
    model: str
    perplexity: float
    kl_to_reference: float | None
    top1_agreement: float | None
    tokens: int
    seconds: float
    windows: int
    seq_len: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate(
    models: Sequence[Path],
    token_windows: np.ndarray,
    *,
    optimization: str = "basic",
    kernels: bool | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """Score every model on the same windows; models after the first are compared to the first.

    Perplexity is exp(mean next-token NLL) over all predicted positions (seq_len - 1 per window). KL is
    mean over positions of KL(reference || model) in nats; top-1 agreement is the fraction of positions
    whose argmax matches the reference's.
    """
    sessions = [make_session(p, optimization, kernels=kernels) for p in models]
    n = len(models)
    nll = np.zeros(n)
    kl = np.zeros(n)
    agree = np.zeros(n)
    seconds = np.zeros(n)
    positions = 0
    for window in tqdm(token_windows, desc="eval", unit="window", disable=not progress, leave=False):
        tokens = window[None, :]
        targets = window[1:]
        ref_logp: np.ndarray | None = None
        for i, session in enumerate(sessions):
            t = time.perf_counter()
            logits = run_logits(session, tokens)[0, :-1]
            seconds[i] += time.perf_counter() - t
            logp = log_softmax(logits)
            nll[i] += -logp[np.arange(len(targets)), targets].sum()
            if ref_logp is None:
                ref_logp = logp
            else:
                kl[i] += (np.exp(ref_logp) * (ref_logp - logp)).sum()
                agree[i] += (ref_logp.argmax(-1) == logp.argmax(-1)).sum()
        positions += len(targets)
    count, seq_len = token_windows.shape
    return [
        EvalResult(
            model=str(models[i]),
            perplexity=float(np.exp(nll[i] / positions)),
            kl_to_reference=None if i == 0 else float(kl[i] / positions),
            top1_agreement=None if i == 0 else float(agree[i] / positions),
            tokens=positions,
            seconds=float(seconds[i]),
            windows=count,
            seq_len=seq_len,
        )
        for i in range(n)
    ]


def validation_logits(
    reference: Path, candidate: Path, tokens: np.ndarray, pad: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [1, positions, vocab] of `reference` and `candidate` (every onnxruntime graph rewrite
    disabled) at the real positions of `tokens` [rows, seq]. A model that takes padded rows also gets
    one padded row (the last row, or a copy of a single row, with a quarter masked: the first quarter, or
    the last for a model that takes right padding, `InputRoles.padding`), so the comparison covers the
    padding path; not when the reference itself is not finite there.

    Models whose weights together exceed `probe.BLOCKWISE_BYTES` run one after the other, each block by
    block (`probe.streamed_logits`), so neither is ever loaded whole."""
    from rotgraph import probe

    ref_roles = read_roles(reference)
    mask = None
    unpadded = tokens
    if pad and ref_roles.attention_mask is not None and tokens.shape[1] >= 8:
        tokens = np.concatenate([tokens, tokens[-1:]]) if len(tokens) == 1 else tokens
        mask = np.ones(tokens.shape, dtype=np.int64)
        quarter = tokens.shape[1] // 4
        mask[-1, slice(-quarter, None) if ref_roles.padding == "right" else slice(0, quarter)] = 0
    stream = file_weight_bytes(reference) + file_weight_bytes(candidate) > probe.BLOCKWISE_BYTES

    def logits(path: Path) -> np.ndarray:
        if stream:
            (out,) = probe.streamed_logits(path, [read_roles(path).feeds(tokens, mask)])
            return out
        return run_logits(make_session(path, "disable"), tokens, mask)

    a = logits(reference)
    real = mask.astype(bool) if mask is not None else np.ones(tokens.shape, dtype=bool)
    if mask is not None and not np.isfinite(a[real]).all():
        logger.warning("%s gives non-finite logits on a padded row: validating on unpadded rows", reference)
        return validation_logits(reference, candidate, unpadded, pad=False)
    b = logits(candidate)
    if a.shape != b.shape:
        raise RotgraphError(f"logit shapes differ: {a.shape} vs {b.shape}")
    return a[real][None], b[real][None]


def file_weight_bytes(path: Path) -> int:
    """Bytes of the initializers of the model file `path` (its weights are not read)."""
    model = ir.load(path)
    return sum(t.nbytes for v in model.graph.initializers.values() if (t := v.const_value) is not None)


def max_logit_difference(reference: Path, candidate: Path, tokens: np.ndarray) -> float:
    """max |logits(candidate) - logits(reference)| over `validation_logits`."""
    return logit_difference(reference, candidate, tokens)[0]


def logit_difference(reference: Path, candidate: Path, tokens: np.ndarray) -> tuple[float, float]:
    """max |logits(candidate) - logits(reference)| and the scale of the reference's logits (max |logit|)
    over `validation_logits`."""
    a, b = validation_logits(reference, candidate, tokens)
    return float(np.abs(a.astype(np.float64) - b).max()), float(np.abs(a).max())
