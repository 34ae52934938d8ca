"""Tiny random-weight decoder models for tests and examples (no network needed).

Norm weights are drawn at random (never all ones: all-ones norms hide fusion bugs) and a few residual
channels of the embedding are scaled up so the models have outliers like trained ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A rotation of the residual stream leaves the function "
    "of the network unchanged while it spreads outliers over all channels. Quantization to four bits "
    "then loses far less information. Every pass is checked against onnxruntime on real text. "
) * 8


def tiny_config(model_type: str = "llama", **overrides: Any) -> Any:
    from transformers import AutoConfig

    base: dict[str, Any] = {
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "vocab_size": 384,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }
    if model_type == "qwen2":
        base["attention_bias"] = True  # Qwen2 always has Q/K/V biases; the flag is for clarity only
    if model_type == "phi3":
        base["pad_token_id"] = 0  # Phi-3's default pad id (32000) lies outside a tiny vocabulary
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on SAMPLE_TEXT (ids below `vocab_size`; <unk>, <s>,
    </s> are 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return tok


def make_tokenizer(folder: Path, vocab_size: int) -> None:
    """`train_tokenizer(vocab_size)` saved as a Hugging Face tokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def make_tiny_model(folder: str | Path, model_type: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-weight causal LM (weights, config, tokenizer) to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(0.2 + 1.8 * torch.rand(module.weight.shape, generator=generator))
        emb = model.get_input_embeddings().weight
        outliers = torch.randperm(emb.shape[1], generator=generator)[:3]
        emb[:, outliers] *= 20.0
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder)
    make_tokenizer(folder, config.vocab_size)
    return folder
