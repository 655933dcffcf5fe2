"""Measure a draft: speculative greedy decoding of held-out prompts against plain KV-cached
greedy decoding of the same model: identical outputs, acceptance length, tokens/s.

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import dataclasses
from typing import Optional

import torch

from nemo_optim import runtime
from nemo_optim.errors import InputError
from nemo_optim.speculative.decoding import drafter_for, greedy_decode, speculative_decode


@dataclasses.dataclass
class SpeculativeEvaluationConfig:
    """Held-out prompts (the data's validation split, never trained on) and decode lengths."""

    num_prompts: int = 8
    prompt_tokens: int = 64
    max_new_tokens: int = 128
    draft_lengths: Optional[list[int]] = None
    """Draft lengths to measure; None means [speculative_config.num_draft_tokens]."""

    def __post_init__(self) -> None:
        errors = [f"{name}={getattr(self, name)} must be at least 1"
                  for name in ("num_prompts", "prompt_tokens", "max_new_tokens") if getattr(self, name) < 1]
        if self.draft_lengths is not None and (not self.draft_lengths or min(self.draft_lengths) < 1):
            errors.append(f"draft_lengths={self.draft_lengths} must be positive integers, or None")
        if errors:
            raise InputError("SpeculativeEvaluationConfig: " + "; ".join(errors) + ".")


@dataclasses.dataclass
class DraftLengthResult:
    draft_length: int
    acceptance_length: float
    """Mean tokens emitted per verifying base forward (accepted drafts + 1), over all rounds."""
    tokens_per_second: float
    baseline_tokens_per_second: float
    """Plain greedy decoding with a KV cache, same model, same prompts, same machine."""
    speedup: float
    identical_prompts: int
    """Prompts whose speculative output equals plain greedy decoding token for token."""
    num_prompts: int
    tokens: int
    drafts: int = 0
    """Verifications of a chain of drafts, as vLLM counts them (`vllm:spec_decode_num_drafts`)."""
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    """Verifications whose i-th draft was accepted, as vLLM counts them
    (`vllm:spec_decode_num_accepted_tokens_per_pos`): drafts accepted past `max_new_tokens` or
    EOS, which the output drops, count too, so 1 + sum / drafts (vLLM's mean acceptance length)
    exceeds `acceptance_length` by up to draft_length * num_prompts / drafts."""


class _CountingDrafter:
    """A drafter that also records how many drafts each verification accepted."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.accepted: list[int] = []

    def start(self, prompt, prefill, pending) -> None:
        self.drafter.start(prompt, prefill, pending)

    def propose(self, k: int) -> list[int]:
        return self.drafter.propose(k)

    def accept(self, num_accepted: int, verify, new_tokens: list[int]) -> None:
        self.accepted.append(num_accepted)
        self.drafter.accept(num_accepted, verify, new_tokens)


@dataclasses.dataclass
class SpeculativeEvaluation:
    results: list[DraftLengthResult]
    prompt_tokens: int
    max_new_tokens: int
    device: str

    @property
    def lossless(self) -> bool:
        return all(r.identical_prompts == r.num_prompts for r in self.results)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "lossless": self.lossless}


def measure_draft(model: torch.nn.Module, prompts: torch.Tensor, draft_lengths: list[int], max_new_tokens: int,
                  eos_id: Optional[int]) -> SpeculativeEvaluation:
    """Decodes every prompt plainly, then speculatively at each draft length (one prompt at a
    time, so both see the same machine load); one untimed warm-up first."""
    model.eval()
    drafter = _CountingDrafter(drafter_for(model))
    greedy_decode(model, prompts[0], 8, eos_id)
    speculative_decode(model, drafter, prompts[0], 8, max(draft_lengths), eos_id)
    plain_seconds = tokens = 0
    spec = {k: {"seconds": 0.0, "emitted": 0, "rounds": 0, "identical": 0, "accepted": []} for k in draft_lengths}
    for prompt in prompts:
        plain = greedy_decode(model, prompt, max_new_tokens, eos_id)
        plain_seconds += plain.seconds
        tokens += len(plain.tokens)
        for k in draft_lengths:
            drafter.accepted = spec[k]["accepted"]
            decoded = speculative_decode(model, drafter, prompt, max_new_tokens, k, eos_id)
            spec[k]["seconds"] += decoded.seconds
            spec[k]["emitted"] += sum(decoded.accepted_per_round)
            spec[k]["rounds"] += len(decoded.accepted_per_round)
            spec[k]["identical"] += decoded.tokens == plain.tokens
    results = []
    for k, totals in spec.items():
        row = DraftLengthResult(
            draft_length=k,
            acceptance_length=totals["emitted"] / totals["rounds"] if totals["rounds"] else float("nan"),
            tokens_per_second=tokens / totals["seconds"], baseline_tokens_per_second=tokens / plain_seconds,
            speedup=plain_seconds / totals["seconds"], identical_prompts=totals["identical"],
            num_prompts=len(prompts), tokens=tokens, drafts=len(totals["accepted"]),
            accepted_per_position=[sum(n > i for n in totals["accepted"]) for i in range(k)])
        results.append(row)
        runtime.print0(f"draft length {k}: acceptance length {row.acceptance_length:.2f}, "
                       f"{row.tokens_per_second:.1f} tokens/s vs {row.baseline_tokens_per_second:.1f} greedy "
                       f"({row.speedup:.2f}x), identical outputs {row.identical_prompts}/{len(prompts)}")
    return SpeculativeEvaluation(results=results, prompt_tokens=prompts.shape[1], max_new_tokens=max_new_tokens,
                                 device=str(runtime.device()))
