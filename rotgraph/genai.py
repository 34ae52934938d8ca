"""onnxruntime-genai folders: `quantize --format genai` writes a folder its generator runs as is.

The folder holds `model.onnx` and its external data, `genai_config.json`, the tokenizer files
onnxruntime-genai reads (`tokenizer.json`, `tokenizer_config.json`), the chat template and, when the
model uses rotgraph's own ops and the compiled kernels run on this machine, the kernel library (named by
`session_options.custom_ops_library`; without it onnxruntime runs the ops' ONNX function bodies).

Every field of `genai_config.json` is read from the graph itself where the graph states it: the input
and output names by role (`rotgraph.inputs`), the cache names as printf patterns over the layers, the
heads and head size from GroupQueryAttention, the vocabulary from the logits. The token ids, hidden
size, model type and context length come from the model's configuration (rotgraph's export metadata,
or the Hugging Face / onnxruntime-genai files beside the source model).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnxruntime as ort

from rotgraph import io
from rotgraph import kernels as rotgraph_kernels
from rotgraph.constants import CHAT_TEMPLATE_KEY, CONFIG_KEY, ROTGRAPH_DOMAIN, SOURCE_KEY
from rotgraph.constants import MS_DOMAIN as _MS
from rotgraph.errors import RotgraphError
from rotgraph.inputs import InputRoles, input_roles
from rotgraph.options import DEFAULT_CONTEXT_LENGTH

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def model_in(path: Path) -> Path:
    """The model file a path names: the path itself, or in an onnxruntime-genai folder the decoder file
    its `genai_config.json` names (`model.onnx` when it has none)."""
    if not path.is_dir():
        return path
    config = path / io.GENAI_CONFIG
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("model", {}).get("decoder", {})
        return path / decoder.get("filename", MODEL_FILE)
    return path / MODEL_FILE


def context_length(source_model: Path) -> int:
    """The longest sequence the model was made for: onnxruntime-genai's `context_length` or Hugging Face's
    `max_position_embeddings`, from the files beside the model, its metadata, or the folder it was
    exported from; else `quantize.DEFAULT_CONTEXT_LENGTH`."""

    config = _configuration(source_model)
    for key in ("context_length", "max_position_embeddings"):
        if isinstance(config.get(key), int):
            return int(config[key])
    logger.warning("%s states no context length: RoPE tables cover %d positions", source_model, DEFAULT_CONTEXT_LENGTH)
    return DEFAULT_CONTEXT_LENGTH


def _metadata(model: Path) -> dict[str, str]:
    proto = onnx.load(str(model), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _configuration(source_model: Path) -> dict[str, Any]:
    """What is known of the model's configuration, later sources filling gaps: rotgraph's export
    metadata, then `config.json` and `generation_config.json` beside the model or in the folder it was
    exported from, then an onnxruntime-genai config beside it."""
    meta = _metadata(source_model)
    found: dict[str, Any] = dict(json.loads(meta.get(CONFIG_KEY, "{}")))
    folders = [source_model.parent]
    if SOURCE_KEY in meta and Path(meta[SOURCE_KEY]).is_dir():
        folders.append(Path(meta[SOURCE_KEY]))
    for folder in folders:
        for name in ("config.json", "generation_config.json"):
            path = folder / name
            if path.is_file():
                for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                    found.setdefault(key, value)
    genai = source_model.parent / io.GENAI_CONFIG
    if genai.is_file():
        model = json.loads(genai.read_text(encoding="utf-8")).get("model", {})
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "context_length", "type"):
            if key in model:
                found.setdefault("model_type" if key == "type" else key, model[key])
        found.setdefault("hidden_size", model.get("decoder", {}).get("hidden_size"))
    return found


def _pattern(names: list[str], what: str) -> str:
    """The printf pattern (one %d for the layer) that gives `names` for layers 0, 1, ..."""
    first = names[0]
    for match in re.finditer(r"(?<!\d)0(?!\d)", first):
        candidate = first[: match.start()] + "%d" + first[match.end() :]
        if all(candidate % i == name for i, name in enumerate(names)):
            return candidate
    raise RotgraphError(f"the {what} names {names[:3]}... do not follow one pattern with the layer number")


def genai_config(model_path: Path, source_model: Path, context: int) -> dict[str, Any]:
    """The `genai_config.json` of the model at `model_path` (see the module docstring)."""
    model = ir.from_proto(onnx.load(str(model_path), load_external_data=False))
    roles = input_roles(model)
    attentions = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == _MS]
    by_name = {c.name: c for c in roles.caches}
    if attentions:
        keys = [by_name[n.inputs[3].name or ""] for n in attentions]  # type: ignore[union-attr]
        values = [by_name[n.inputs[4].name or ""] for n in attentions]  # type: ignore[union-attr]
        heads = attentions[0].attributes.get_int("num_heads", 0)
    else:  # eager attention: caches come as key, value per layer in input order
        keys, values = list(roles.caches[0::2]), list(roles.caches[1::2])
        heads = 0
    if not keys or len(keys) != len(values) or len(roles.caches) != 2 * len(keys):
        raise RotgraphError(f"{model_path}: onnxruntime-genai needs a key and a value cache per layer")
    if any(c.dtype != keys[0].dtype or c.width != keys[0].width for c in keys + values):
        raise RotgraphError(f"{model_path}: caches of different types or widths (a quantized cache?)")
    config = _configuration(source_model)
    head_size, kv_heads = keys[0].width, keys[0].heads
    if attentions and attentions[0].attributes.get_int("kv_cache_bit_width", 0) == 4:
        head_size *= 2  # int4 codes, two per byte of the cache
    heads = heads or int(config.get("num_attention_heads", 0))
    logits = model.graph.outputs[0]
    vocab = logits.shape[-1] if logits.shape is not None and len(logits.shape) else config.get("vocab_size")
    eos = config.get("eos_token_id")
    inputs: dict[str, Any] = {"input_ids": roles.input_ids}
    if roles.attention_mask:
        inputs["attention_mask"] = roles.attention_mask
    if roles.position_ids:
        inputs["position_ids"] = roles.position_ids
    inputs["past_key_names"] = _pattern([c.name for c in keys], "past key")
    inputs["past_value_names"] = _pattern([c.name for c in values], "past value")
    outputs = {
        "logits": logits.name,
        "present_key_names": _pattern([c.present for c in keys], "present key"),
        "present_value_names": _pattern([c.present for c in values], "present value"),
    }
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    library = _kernel_library(model_path, model)
    if library is not None:
        session["custom_ops_library"] = library.name
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", eos),
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": model_path.name,
                "head_size": head_size,
                "hidden_size": int(config.get("hidden_size") or heads * head_size),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": len(keys),
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": _first(config.get("pad_token_id"))
            if config.get("pad_token_id") is not None
            else _first(eos),
            "type": config.get("model_type", "llama"),
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_buffer(model, roles),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _first(token: Any) -> Any:
    return token[0] if isinstance(token, list) and token else token


def shares_buffer(model: ir.Model, roles: InputRoles) -> bool:
    """Whether past and present caches may be one static buffer: every cache is read by a
    GroupQueryAttention whose sequence lengths come from the attention mask, and by nothing else. A
    shared buffer has the context's length, not the number of cached tokens: positions computed from a
    cache's shape (RoPE outside the op, as kv schemes keep it for R3) would be off by it, which RoPE
    hides in the prompt (scores depend on relative positions) but not in decoding or in a quantized
    cache (measured: int4 codes of keys at shifted positions moved the prompt's logits by 7e-3)."""
    attentions = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == _MS]
    readers = {id(n) for n in attentions}
    caches = {c.name for c in roles.caches}
    for value in model.graph.inputs:
        if value.name in caches and any(id(use.node) not in readers for use in value.uses()):
            return False
    mask = next((v for v in model.graph.inputs if v.name == roles.attention_mask), None)
    if not attentions or mask is None or 2 * len(attentions) != len(roles.caches):
        return False
    from rotgraph.inputs import reached_by_data

    return all(reached_by_data([n.inputs[5], n.inputs[6]], [mask]) for n in attentions)  # type: ignore[list-item]


def _kernel_library(model_path: Path, model: ir.Model) -> Path | None:
    """rotgraph's kernel library when the model has rotgraph ops and the library runs it here."""
    if not any(n.domain == ROTGRAPH_DOMAIN for n in model.graph):
        return None
    if not rotgraph_kernels.register(ort.SessionOptions(), model_path, None):
        library = rotgraph_kernels.library_path()
        why = rotgraph_kernels.model_reason(model_path) if library is not None else None
        why = why or (rotgraph_kernels.unsupported_reason(library) if library is not None else None)
        logger.warning(
            "rotgraph's kernels are not used (%s): the folder runs the ops' function bodies",
            why or rotgraph_kernels.hidden_or_missing(),
        )
        return None
    return rotgraph_kernels.library_path()


def write_folder(model_path: Path, source_model: Path, context: int) -> None:
    """Complete the folder of `model_path` for onnxruntime-genai: tokenizer configuration and chat
    template (when the source has none beside it), the kernel library, then `genai_config.json`."""
    folder = model_path.parent
    if not (folder / io.TOKENIZER_FILE).is_file():
        raise RotgraphError(f"no {io.TOKENIZER_FILE} beside {source_model}: onnxruntime-genai needs one")
    meta = _metadata(model_path)
    config = _configuration(source_model)
    tokenizer_config = folder / TOKENIZER_CONFIG
    template = meta.get(CHAT_TEMPLATE_KEY)
    if not tokenizer_config.is_file():
        _atomic_json(tokenizer_config, _tokenizer_config(folder / io.TOKENIZER_FILE, config, template))
    if template and not (folder / CHAT_TEMPLATE_FILE).is_file():
        (folder / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    config_json = genai_config(model_path, source_model, context)
    library = config_json["model"]["decoder"]["session_options"].get("custom_ops_library")
    if library:
        shutil.copyfile(rotgraph_kernels.library_path(), folder / library)  # type: ignore[arg-type]
    _atomic_json(folder / io.GENAI_CONFIG, config_json)


def _tokenizer_config(tokenizer: Path, config: dict[str, Any], template: str | None) -> dict[str, Any]:
    """A minimal Hugging Face tokenizer configuration: the special tokens by the model's ids."""
    vocab = json.loads(tokenizer.read_text(encoding="utf-8"))
    by_id = {t["id"]: t["content"] for t in vocab.get("added_tokens", [])}
    result: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key in ("bos", "eos", "pad"):
        token = config.get(f"{key}_token_id")
        token = token[0] if isinstance(token, list) and token else token
        if isinstance(token, int) and token in by_id:
            result[f"{key}_token"] = by_id[token]
    if template:
        result["chat_template"] = template
    return result


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=4) + "\n")
    os.replace(temporary, path)
