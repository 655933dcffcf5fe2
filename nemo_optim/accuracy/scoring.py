"""Log-likelihood scoring and greedy generation on megatron models, at any TP/PP.

Tokenization follows lm-evaluation-harness's causal-LM convention, so that scores equal its
Hugging Face backend's: trailing spaces of the context move to the continuation, the pair is
encoded whole and the context's tokens are cut off the front; an empty context is replaced by
the end-of-text token; sequences longer than `max_length + 1` lose tokens at the left.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nemo_optim import progress as progress_bars
from nemo_optim.models.forward import broadcast_from_last_stage, forward_logits

TokenPair = tuple[list[int], list[int]]
"""(context token ids, continuation token ids)."""


def encode_pair(tokenizer, context: str, continuation: str) -> TokenPair:
    if not context:
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.eos_token_id
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[TokenPair],
    *,
    max_length: int,
    micro_batch_size: int = 8,
    pad_id: int = 0,
    description: str = "score",
) -> tuple[list[tuple[float, bool]], float]:
    """For each (context, continuation): the summed log-probability of the continuation and
    whether greedy decoding would produce it; plus the seconds spent in forward passes.
    Every rank calls it with the same pairs and gets the same answer."""
    model.eval()
    rows = []
    for context_ids, continuation_ids in pairs:
        if not continuation_ids:
            raise ValueError("score_continuations: an empty continuation has no log-likelihood.")
        rows.append(((context_ids + continuation_ids)[-(max_length + 1):], len(continuation_ids)))
    # longest first, as lm-eval does: similar lengths share a batch, and memory peaks at once
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    seconds = 0.0
    with progress_bars.progress(total=len(rows), description=description) as progress:
        for start in range(0, len(order), micro_batch_size):
            batch = [rows[i] for i in order[start : start + micro_batch_size]]
            width = max(len(tokens) for tokens, _ in batch)
            # right padding: causal attention keeps every real position blind to the pad
            tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                tokens[row, : len(ids)] = torch.tensor(ids)
            began = time.perf_counter()
            logits = forward_logits(model, tokens)
            seconds += time.perf_counter() - began
            progress.update(len(batch))
            if logits is None:  # not the last pipeline stage
                continue
            for row, (ids, length) in enumerate(batch):
                # logits at position p predict token p + 1
                scored = F.log_softmax(logits[row, len(ids) - 1 - length : len(ids) - 1], dim=-1)
                targets = torch.tensor(ids[-length:], device=scored.device)
                log_prob = scored.gather(-1, targets[:, None]).sum().item()
                greedy = bool((scored.argmax(-1) == targets).all())
                results[order[start + row]] = (log_prob, greedy)
    return broadcast_from_last_stage(results), seconds


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    max_length: int,
    eos_id: int | None,
    stop=None,
    micro_batch_size: int = 8,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of token prompts (each at most `max_new_tokens`, ending before EOS).
    `stop(row, new_ids) -> bool` ends a row early (lm-eval's `until` strings). No KV cache:
    every step is a full forward of the batch, which is what megatron's training model offers;
    fine for evaluation-sized outputs. Every rank calls it and gets the same answer."""
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, len(prompts))))
        sequences = {row: list(prompts[row])[-max_length:] for row in rows}
        active = list(rows)
        for _ in range(max_new_tokens):
            width = max(len(sequences[row]) for row in active)
            tokens = torch.full((len(active), width + 1), pad_id, dtype=torch.long)
            for index, row in enumerate(active):
                tokens[index, : len(sequences[row])] = torch.tensor(sequences[row])
            logits = forward_logits(model, tokens)
            choices = None
            if logits is not None:
                choices = [int(logits[index, len(sequences[row]) - 1].argmax()) for index, row in enumerate(active)]
            choices = broadcast_from_last_stage(choices)
            still_active = []
            for row, token in zip(active, choices):
                if token == eos_id:
                    continue
                outputs[row].append(token)
                sequences[row] = (sequences[row] + [token])[-max_length:]
                if stop is None or not stop(row, outputs[row]):
                    still_active.append(row)
            active = still_active
            if not active:
                break
    return outputs
