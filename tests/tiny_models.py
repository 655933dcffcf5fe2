"""Tiny real models for tests: random HF Llama / Qwen2 / Qwen3 (2 layers, hidden 64) with a
real byte-level BPE tokenizer trained on the embedded corpus."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB_SIZE = 512
EOS = "<|endoftext|>"


def train_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemo_optim.data.corpus import DataConfig, load_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(load_documents(DataConfig(source="embedded:pydoc")), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


ARCHITECTURES = ("llama", "llama_tied", "qwen2", "qwen3")


def make_tiny_hf_model(arch: str, directory: Path, tokenizer, seed: int = 0, hidden_size: int = 64) -> Path:
    """Saves a random 2-layer HF model of `arch` (hidden 64: head size 16; vLLM's CPU attention
    needs 128: head size 32) with `tokenizer` into `directory`.

    Norm weights and biases are perturbed so that a converter that drops them is caught.
    """
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    if arch == "llama":
        config, cls = (transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0),
                       transformers.LlamaForCausalLM)
    elif arch == "llama_tied":
        config, cls = (transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500000.0),
                       transformers.LlamaForCausalLM)
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common, tie_word_embeddings=False), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = (transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
                       transformers.Qwen3ForCausalLM)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # as model hubs ship it, readable by transformers 4 (NeMo 2's) and 5 alike
    from nemo_optim import compat

    compat.tokenizer_readable_by_transformers4(directory)
    return directory
