"""Evaluate a model: perplexity, KL divergence and top-1 agreement against a reference
model, tokens/second; multiple-choice task accuracy (`accuracy`, default: the embedded
next-sentence cloze over held-out Python documentation) and lm-evaluation-harness tasks
(`lm_eval`, optional extra). Results are a dataclass and JSON.

The `evaluate` stage (nemo_optim.stages.evaluate) loads models and calls `evaluate_model`.
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these configs' annotations.

import dataclasses
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

from nemo_optim import runtime
from nemo_optim.progress import progress
from nemo_optim.accuracy.multiple_choice import AccuracyConfig
from nemo_optim.data.corpus import DataConfig, Split
from nemo_optim.data.packing import packed_sequences
from nemo_optim.errors import InputError
from nemo_optim.models.forward import broadcast_from_last_stage, forward_logits


@dataclasses.dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks, read from this machine (nothing is downloaded)."""

    tasks: list[str] = dataclasses.field(default_factory=list)
    """Task names: lm-eval's registry or YAML files under `include_path`."""
    include_path: Optional[str] = None
    """A directory of task YAML files."""
    num_fewshot: Optional[int] = None
    limit: Optional[int] = None
    """Documents per task (None: all)."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.tasks:
            raise InputError("LmEvalConfig: tasks=[] names no task; give e.g. lm_eval.tasks=[my_task].")


@dataclasses.dataclass
class EvaluationConfig:
    """What text a model is evaluated on."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    split: Split = "validation"
    num_sequences: int = 16
    """Sequences of `data.seq_length` tokens to evaluate (the first N of the split)."""
    micro_batch_size: int = 4
    accuracy: Optional[AccuracyConfig] = None
    """A multiple-choice task to score (None: perplexity metrics only)."""
    lm_eval: Optional[LmEvalConfig] = None
    """lm-evaluation-harness tasks to run (needs `pip install nemo-optim[eval]`)."""

    def __post_init__(self) -> None:
        if self.num_sequences < 1:
            raise InputError(f"EvaluationConfig: num_sequences={self.num_sequences} must be at least 1.")
        if self.micro_batch_size < 1:
            raise InputError(f"EvaluationConfig: micro_batch_size={self.micro_batch_size} must be at least 1.")


@dataclasses.dataclass
class EvaluationResult:
    loss: float
    """Mean next-token cross-entropy (nats) over evaluated tokens."""
    perplexity: float
    tokens: int
    seconds: float
    """Wall time of the evaluated model's forward passes only."""
    tokens_per_second: float
    kl_to_reference: Optional[float] = None
    """Mean per-token KL(reference || model) in nats."""
    top1_agreement: Optional[float] = None
    """Share of positions where model and reference predict the same next token."""
    reference_perplexity: Optional[float] = None
    task_accuracy: Optional[dict] = None
    """`AccuracyResult` of `EvaluationConfig.accuracy` as a dict."""
    lm_eval: Optional[dict] = None
    """lm-eval task -> {metric: value}."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    micro_batch_size: int = 4,
    reference: Optional[torch.nn.Module] = None,
) -> EvaluationResult:
    """Metrics of `model` on `[N, S+1]` token rows (every rank calls it; all get the result)."""
    model.eval()
    if reference is not None:
        reference.eval()
    loss_sum = ref_loss_sum = kl_sum = agree = count = 0.0
    seconds = 0.0
    for start in progress(range(0, len(tokens), micro_batch_size), description="evaluation"):
        batch = tokens[start : start + micro_batch_size]
        labels = batch[:, 1:].to(runtime.device())
        began = time.perf_counter()
        logits = forward_logits(model, batch)
        seconds += time.perf_counter() - began
        ref_logits = forward_logits(reference, batch) if reference is not None else None
        if logits is None:  # not the last pipeline stage
            continue
        log_probs = F.log_softmax(logits, dim=-1)
        loss_sum += F.nll_loss(log_probs.flatten(0, 1), labels.flatten(), reduction="sum").item()
        count += labels.numel()
        if ref_logits is not None:
            ref_log_probs = F.log_softmax(ref_logits, dim=-1)
            ref_loss_sum += F.nll_loss(ref_log_probs.flatten(0, 1), labels.flatten(), reduction="sum").item()
            kl_sum += F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="sum").item()
            agree += (logits.argmax(-1) == ref_logits.argmax(-1)).sum().item()
    totals = broadcast_from_last_stage((loss_sum, ref_loss_sum, kl_sum, agree, count))
    loss_sum, ref_loss_sum, kl_sum, agree, count = totals
    loss = loss_sum / count
    return EvaluationResult(
        loss=loss,
        perplexity=math.exp(loss),
        tokens=int(count),
        seconds=seconds,
        tokens_per_second=count / seconds if seconds else float("nan"),
        kl_to_reference=kl_sum / count if reference is not None else None,
        top1_agreement=agree / count if reference is not None else None,
        reference_perplexity=math.exp(ref_loss_sum / count) if reference is not None else None,
    )


def evaluation_tokens(config: EvaluationConfig, tokenizer) -> torch.Tensor:
    return packed_sequences(config.data, config.split, tokenizer, config.num_sequences)
