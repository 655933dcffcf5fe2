"""Forward passes through megatron's schedules, so the same call works at PP=1 and PP>1."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from nemo_optim import runtime

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def make_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A `[B, S+1]` row of packed tokens -> model inputs and next-token labels."""
    tokens = tokens.to(runtime.device())
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    return {
        "input_ids": input_ids.contiguous(),
        "labels": labels.contiguous(),
        "position_ids": position_ids,
        "loss_mask": torch.ones_like(labels, dtype=torch.float32),
    }


def _forward_step(loss_fn: LossFn, with_labels: bool, data_iterator, model):
    batch = next(data_iterator)
    # with labels, megatron's GPTModel returns the per-token LM loss `[B, S]` instead of logits
    labels = {"labels": batch["labels"]} if with_labels else {}
    output = model(batch["input_ids"], batch["position_ids"], None, **labels)
    return output, functools.partial(loss_fn, batch)


def run_schedule(
    model: torch.nn.Module,
    micro_batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    *,
    num_micro_batches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    with_labels: bool = False,
    adjust_tensor_shapes_fn=None,
) -> list[dict[str, Any]]:
    """Runs megatron's forward(-backward) schedule; returns what `loss_fn` reported, one dict
    per micro-batch on the last pipeline stage and an empty list elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, loss_fn, with_labels),
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=num_micro_batches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
    )


def run_micro_batches(
    model: torch.nn.Module,
    micro_batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    *,
    num_micro_batches: int,
    forward_only: bool,
    **_schedule_arguments,
) -> list[dict[str, Any]]:
    """`run_schedule`'s contract for a model outside megatron (a transformers model; data
    parallelism is the training loop's gradient all-reduce): forward each micro-batch with its
    labels, backward `loss / num_micro_batches` (what megatron's schedule does), return what
    `loss_fn` reported."""
    reported = []
    for batch in micro_batches:
        output = model(input_ids=batch["input_ids"], labels=batch["labels"])
        loss, metrics = loss_fn(batch, output)
        if not forward_only:
            (loss / num_micro_batches).backward()
        reported.append(metrics)
    return reported


def _logits_loss(batch, output):
    from megatron.core import tensor_parallel

    # each TP rank holds a slice of the vocabulary; gather the full distribution
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach())
    return torch.zeros((), device=output.device), {"logits": logits}


@torch.no_grad()
def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits `[B, S, V]` of a `[B, S+1]` token batch on the last pipeline
    stage; None on other stages."""
    batch = make_batch(tokens)
    outputs = run_schedule(
        model, [batch], _logits_loss, num_micro_batches=1,
        seq_length=batch["input_ids"].shape[1], micro_batch_size=batch["input_ids"].shape[0],
        forward_only=True,
    )
    return outputs[0]["logits"].float() if outputs else None


def _discard_output(batch, output):
    # (None while ModelOpt's layer-wise calibration captures a layer's inputs: it stops the model there)
    return torch.zeros((), device=runtime.device() if output is None else output.device), {}


@contextlib.contextmanager
def output_layer_skipped(model: torch.nn.Module):
    """Forward passes stop after the decoder's final norm: no output layer, no `[B, S, V]` logits
    (with a large vocabulary the largest activations of the pass and a large share of its compute:
    benchmarks/results/README.md). For passes whose output nobody reads. megatron's GPTModel returns
    the hidden states when `post_process` is off, as on a pipeline stage before the last."""
    if not getattr(model, "post_process", False):
        yield
        return
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


@torch.no_grad()
def forward_only(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """Runs a `[B, S+1]` token batch through the model and drops the output (calibration passes:
    ModelOpt's hooks record what they need on the way)."""
    batch = make_batch(tokens)
    run_schedule(model, [batch], _discard_output, num_micro_batches=1, seq_length=batch["input_ids"].shape[1],
                 micro_batch_size=batch["input_ids"].shape[0], forward_only=True)


def broadcast_from_last_stage(value: Any) -> Any:
    """Sends a Python object from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a `[B, S]` prompt batch without a KV cache (a reference for
    engines and a smoke check of a model, not a server); every pipeline stage gets them."""
    tokens = prompts
    for _ in range(new_tokens):
        logits = forward_logits(model, torch.cat([tokens, tokens[:, :1]], dim=1))  # (a dummy label column)
        chosen = broadcast_from_last_stage(logits[:, -1].argmax(-1) if logits is not None else None)
        tokens = torch.cat([tokens, chosen[:, None].to(tokens.device)], dim=1)
    return tokens[:, prompts.shape[1]:].tolist()


def greedy_sample(model: torch.nn.Module, tokenizer, prompt: str = "def fibonacci(n):", new_tokens: int = 16) -> str:
    """A prompt's greedy continuation as text."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids + greedy_tokens(model, torch.tensor([ids]), new_tokens)[0])
