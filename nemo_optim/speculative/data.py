"""Training text for draft heads: the data source as it is, or the base model's own greedy
continuations of prompts taken from it ("self-distillation data", what EAGLE's authors
recommend: the draft learns what the base model writes, not what the corpus says). Also the
held-out prompts the draft is measured on.

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig, DataError, Split, split_documents
from nemo_optim.data.packing import pack_tokens


@dataclasses.dataclass
class SelfDistillationConfig:
    """Generate the training text with the base model (greedy) instead of reading it."""

    num_prompts: int = 0
    """Prompts from the training split to continue; 0 trains on the data source's text."""
    prompt_tokens: int = 32
    """Tokens of each training document used as its prompt."""
    continuation_tokens: int = 224
    """Tokens the base model generates after each prompt (fewer if it ends with EOS)."""
    batch_size: int = 16
    """Prompts generated together (one batched KV-cached greedy decode)."""
    with_source_text: bool = False
    """Also train on the data source's own training text (more varied contexts for the same
    cost per step; EAGLE's targets are the base model's distributions on either)."""

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "continuation_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"SelfDistillationConfig: {name}={getattr(self, name)} must be at least 1.")
        if self.num_prompts < 0:
            raise DataError(f"SelfDistillationConfig: num_prompts={self.num_prompts} must not be negative.")


def document_prompts(data: DataConfig, split: Split, tokenizer, num_prompts: int, prompt_tokens: int) -> torch.Tensor:
    """`[num_prompts, prompt_tokens]`: the first tokens of the first documents of `split` that
    are long enough (deterministic: the split is a hash of each document)."""
    prompts = []
    for document in split_documents(data, split):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) > prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == num_prompts:
            return torch.tensor(prompts, dtype=torch.long)
    raise DataError(
        f"{split} split of source={data.source!r} has {len(prompts)} documents longer than {prompt_tokens} "
        f"tokens, {num_prompts} prompts requested; lower the count or prompt length, or add text.")


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos_id,
                         batch_size: int) -> list[list[int]]:
    """Each prompt followed by the base model's greedy continuation (up to EOS), batched
    through transformers' own KV-cached generation."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size].to(runtime.device())
        generated = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=max_new_tokens,
                                   min_new_tokens=1, do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        for prompt, row in zip(batch.tolist(), generated[:, batch.shape[1]:].tolist()):
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            rows.append(prompt + row)
    return rows


def _base_identity(hf_dir: Path) -> list[str]:
    """The base model's weight files with size and modification time."""
    return [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(hf_dir.glob("*.safetensors"))]


def training_rows(base: torch.nn.Module, base_hf_dir: Path, data: DataConfig, tokenizer,
                  self_distillation: SelfDistillationConfig) -> torch.Tensor:
    """`[N, seq_length + 1]` training rows. Generated ones are cached (in nemo-optim's cache
    directory, by the base model's files and the settings that made them), so a resumed run or
    another draft of the same model does not generate them again."""
    from nemo_optim.data.packing import packed_sequences
    from nemo_optim.models.hf import cache_dir

    if self_distillation.num_prompts == 0:
        return packed_sequences(data, "train", tokenizer)
    generation = {k: v for k, v in dataclasses.asdict(self_distillation).items() if k != "with_source_text"}
    key = hashlib.sha256(json.dumps([dataclasses.asdict(data), generation,
                                     str(Path(base_hf_dir).resolve()), _base_identity(Path(base_hf_dir))],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / "self_distillation" / f"{key}.pt"
    if not cached.is_file() and runtime.is_main_process():
        _generate(base, data, tokenizer, self_distillation, cached)
    runtime.barrier()  # the other processes read what the main one generated
    generated = torch.load(cached)
    if self_distillation.with_source_text:
        return torch.cat([generated, packed_sequences(data, "train", tokenizer)])
    return generated


def _generate(base: torch.nn.Module, data: DataConfig, tokenizer, self_distillation: SelfDistillationConfig,
              cached: Path) -> None:
    prompts = document_prompts(data, "train", tokenizer, self_distillation.num_prompts, self_distillation.prompt_tokens)
    runtime.print0(f"generating self-distillation data: {len(prompts)} prompts x "
                   f"{self_distillation.continuation_tokens} tokens")
    continued = greedy_continuations(base, prompts, self_distillation.continuation_tokens, tokenizer.eos_token_id,
                                     self_distillation.batch_size)
    rows = pack_tokens(continued, data.seq_length, tokenizer.eos_token_id)
    if len(rows) == 0:
        raise DataError(f"self-distillation made fewer than {data.seq_length + 1} tokens; raise num_prompts or "
                        f"continuation_tokens, or lower data.seq_length.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    torch.save(rows, partial)
    partial.rename(cached)  # a killed save never leaves a truncated cache file
