"""Greedy text generation with onnxruntime, streaming tokens as they are produced.

Graphs with a KV cache (`rotgraph export --with-past`, or another exporter's) run the prompt once
(prefill) and then one token per step, feeding each step's present outputs back as the past inputs
they pair with; the attention mask grows by one column per step and the position ids are the step's
positions, for graphs that take them (inputs are found by role, `rotgraph.inputs`). Graphs without a
cache are run on the whole sequence at every step (correct, but each step costs a full prefill).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rotgraph import io
from rotgraph.constants import CHAT_TEMPLATE_KEY, CONFIG_KEY
from rotgraph.errors import RotgraphError
from rotgraph.evaluate import make_session, model_feeds, roles

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    prompt_tokens: list[int]
    new_tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # the single-token steps after the prefill
    decode_steps: int = 0
    stopped_at_eos: bool = False

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_steps else float("nan")


def has_cache(session: ort.InferenceSession) -> bool:
    return bool(roles(session).caches)


class Decoder:
    """One onnxruntime session (from `evaluate.make_session`) and its cache state; `step` takes new
    tokens and returns the last logits. One unpadded row: mask all ones, positions 0, 1, 2, ..."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.roles = roles(session)
        self.cached = bool(self.roles.caches)
        self.outputs = [o.name for o in session.get_outputs()]
        self.tokens: np.ndarray = np.zeros((1, 0), dtype=np.int64)
        self.past: dict[str, np.ndarray] = {c.name: c.empty(1) for c in self.roles.caches}

    def step(self, new: np.ndarray) -> np.ndarray:
        """Append `new` [1, n] token ids; logits of the last position [vocab]."""
        self.tokens = np.concatenate([self.tokens, new.astype(np.int64)], axis=1)
        if not self.cached:
            outs = self.session.run(self.outputs[:1], model_feeds(self.session, self.tokens))
            return np.asarray(outs[0])[0, -1]
        feeds = self.roles.feeds(new, past=self.past)  # mask: ones over past + new; positions: past length on
        results = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        self.past = self.roles.next_past(results)
        return np.asarray(results[self.outputs[0]])[0, -1]

    def cache_bytes(self) -> int:
        return sum(v.nbytes for v in self.past.values())


def load_tokenizer(model: Path, tokenizer: Path | None = None):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    path = tokenizer or model.parent / io.TOKENIZER_FILE
    if not path.is_file():
        raise RotgraphError(f"no tokenizer: put {io.TOKENIZER_FILE} beside {model} or pass --tokenizer")
    return Tokenizer.from_file(str(path))


def _metadata(model: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def chat_prompt(template: str, prompt: str) -> str:
    """`prompt` as one user turn of the model's chat template, ready for the assistant's answer."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, bos_token="", eos_token=""
    )


def generate(
    model: Path,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    chat: bool = False,
    tokenizer: Path | None = None,
    on_text: Callable[[str], None] | None = None,
    optimization: str = "all",
    threads: int | None = None,
    kernels: bool | None = None,
) -> Generation:
    """Greedy decoding of `model` from `prompt`; `on_text` receives the text as it grows. `kernels`: see
    `evaluate.make_session`."""
    if max_new_tokens < 1:
        raise RotgraphError("--max-new-tokens must be at least 1")
    if not model.is_file():
        raise RotgraphError(f"{model}: no such model file")
    tok = load_tokenizer(model, tokenizer)
    meta = _metadata(model)
    if chat:
        template = meta.get(CHAT_TEMPLATE_KEY)
        if not template:
            raise RotgraphError(f"{model}: no chat template in the model metadata (re-export it, or drop --chat)")
        prompt = chat_prompt(template, prompt)
    config = json.loads(meta.get(CONFIG_KEY, "{}"))
    eos = config.get("eos_token_id")
    ids = tok.encode(prompt).ids
    if not ids:
        raise RotgraphError("the prompt encodes to no tokens")
    decoder = Decoder(make_session(model, optimization, threads, kernels))
    if not decoder.cached:
        logger.warning("%s has no KV cache: every step reruns the whole sequence (export --with-past)", model)
    result = Generation(prompt_tokens=ids)
    shown = ""
    start = time.perf_counter()
    logits = decoder.step(np.array([ids]))
    result.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(max_new_tokens):
        token = int(np.argmax(logits))
        if token == eos:
            result.stopped_at_eos = True
            break
        result.new_tokens.append(token)
        text = tok.decode(result.new_tokens)
        if on_text is not None and not text.endswith("\ufffd") and text.startswith(shown):
            on_text(text[len(shown) :])
            shown = text
        if i + 1 < max_new_tokens:
            logits = decoder.step(np.array([[token]]))
            result.decode_steps += 1
    result.decode_seconds = time.perf_counter() - start
    result.text = tok.decode(result.new_tokens)
    if on_text is not None and result.text.startswith(shown) and len(result.text) > len(shown):
        on_text(result.text[len(shown) :])
    return result
