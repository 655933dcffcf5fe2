"""Greedy decoding with a KV cache, and lossless speculative greedy decoding with chain drafts.

One round of speculative decoding (batch 1):
  1. the drafter proposes k tokens d_1..d_k after the pending token x (EAGLE: k steps of its
     own decoder layer with its own KV cache; Medusa: k heads on the last hidden state),
  2. the base model runs once on [x, d_1..d_k] with its KV cache, giving its greedy choices
     g_0..g_k,
  3. the longest prefix with d_i == g_{i-1} is accepted (n tokens), g_n is added as the
     base model's own next token, and both KV caches are cut back to what was accepted.
Every emitted token is the base model's greedy choice, so the output equals plain greedy
decoding token for token; the acceptance length is the mean tokens emitted per base forward
(n + 1 per round), as ModelOpt's acceptance-rate validation counts it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Protocol

import torch

from nemo_optim import compat, runtime


@dataclasses.dataclass
class DecodeResult:
    tokens: list[int]
    """Generated tokens (the prompt excluded), up to and including EOS."""
    seconds: float
    """Wall time of the whole generation, prefill included."""
    accepted_per_round: list[int] = dataclasses.field(default_factory=list)
    """Speculative decoding: tokens emitted per verifying base forward (accepted drafts + 1)."""


class Drafter(Protocol):
    """Proposes draft tokens; told after each verification what was accepted."""

    def start(self, prompt: torch.Tensor, prefill: "BaseOutput", pending: int) -> None: ...

    def propose(self, k: int) -> list[int]: ...

    def accept(self, num_accepted: int, verify: "BaseOutput", new_tokens: list[int]) -> None: ...


@dataclasses.dataclass
class BaseOutput:
    logits: torch.Tensor
    """[T, V] for the T tokens fed."""
    last_hidden: torch.Tensor
    """[1, T, H] after the final norm (EAGLE-1 and Medusa read it)."""
    aux_hidden: Optional[torch.Tensor]
    """[1, T, n*H] EAGLE-3's hidden states of n base layers, None for other models."""


def _sync() -> None:
    if runtime.use_cuda():
        torch.cuda.synchronize()


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def base_forward(model: torch.nn.Module, input_ids: torch.Tensor, cache) -> BaseOutput:
    """The base model (a transformers *ForCausalLM, converted by ModelOpt or not) on
    `input_ids` [1, T] after what `cache` holds."""
    body_output = model.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    hidden = body_output.last_hidden_state
    aux = model.pop_and_gather_aux_hiddens() if hasattr(model, "_aux_hidden_states") else None
    return BaseOutput(logits=model.lm_head(hidden)[0].float(), last_hidden=hidden, aux_hidden=aux)


def _stop_index(tokens: list[int], max_new_tokens: int, eos_id: Optional[int]) -> int:
    end = min(len(tokens), max_new_tokens)
    if eos_id is not None and eos_id in tokens[:end]:
        end = tokens.index(eos_id) + 1
    return end


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                  eos_id: Optional[int] = None) -> DecodeResult:
    """Plain greedy decoding with a KV cache: one base forward per token."""
    prompt = prompt.view(1, -1).to(runtime.device())
    _sync()
    began = time.perf_counter()
    cache = new_cache(model)
    output = base_forward(model, prompt, cache)
    tokens = [int(output.logits[-1].argmax())]
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        output = base_forward(model, torch.tensor([[tokens[-1]]], device=prompt.device), cache)
        tokens.append(int(output.logits[-1].argmax()))
    _sync()
    return DecodeResult(tokens=tokens, seconds=time.perf_counter() - began)


@torch.no_grad()
def speculative_decode(model: torch.nn.Module, drafter: Drafter, prompt: torch.Tensor, max_new_tokens: int,
                       num_draft_tokens: int, eos_id: Optional[int] = None) -> DecodeResult:
    """Speculative greedy decoding (module docstring); emits what `greedy_decode` emits."""
    prompt = prompt.view(1, -1).to(runtime.device())
    _sync()
    began = time.perf_counter()
    cache = new_cache(model)
    prefill = base_forward(model, prompt, cache)
    pending = int(prefill.logits[-1].argmax())
    drafter.start(prompt, prefill, pending)
    tokens, rounds = [pending], []
    committed = prompt.shape[1]  # tokens in the base KV cache; `pending` is not fed yet
    while len(tokens) < max_new_tokens and pending != eos_id:
        drafts = drafter.propose(num_draft_tokens)
        verify = base_forward(model, torch.tensor([[pending] + drafts], device=prompt.device), cache)
        choices = verify.logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        new_tokens = drafts[:accepted] + [choices[accepted]]
        committed += accepted + 1
        cache.crop(committed)
        drafter.accept(accepted, verify, new_tokens)
        tokens += new_tokens
        rounds.append(len(new_tokens))
        pending = tokens[-1]
        if eos_id is not None and eos_id in new_tokens:  # an accepted draft ended the text
            break
    end = _stop_index(tokens, max_new_tokens, eos_id)
    if end < len(tokens) and rounds:  # the last round's overshoot is not output
        rounds[-1] -= len(tokens) - end
    _sync()
    return DecodeResult(tokens=tokens[:end], seconds=time.perf_counter() - began, accepted_per_round=rounds)


class EagleDrafter:
    """Chain drafts from ModelOpt's transformers EAGLE module (EAGLE-3 or EAGLE-1) with its own
    KV cache. Draft position j reads the base model's features at j and the embedding of the
    token at j+1, and predicts the token at j+2."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = None
        self.features = self.next_tokens = None  # inputs of the positions not in the draft cache yet
        self.fed_with_base_features = 0

    def _features(self, output: BaseOutput) -> torch.Tensor:
        if self.model.eagle_config.use_aux_hidden_state:
            return self.model.eagle_module.fc(output.aux_hidden)
        return output.last_hidden

    def _draft_step(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
        model = self.model
        prenorm, logits, self.cache = compat.eagle_draft_forward(model, features, tokens, self.cache.get_seq_length(),
                                                                 self.cache)
        draft = int(logits[0, -1].argmax())
        if hasattr(model.eagle_module, "d2t"):
            draft += int(model.eagle_module.d2t[draft])
        return draft, prenorm[:, -1:]

    def start(self, prompt: torch.Tensor, prefill: BaseOutput, pending: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.eagle_module.config)
        self.features = self._features(prefill)
        self.next_tokens = torch.cat([prompt[:, 1:], torch.tensor([[pending]], device=prompt.device)], dim=1)

    def propose(self, k: int) -> list[int]:
        draft, hidden = self._draft_step(self.features, self.next_tokens)
        self.fed_with_base_features = self.cache.get_seq_length()
        drafts = [draft]
        for _ in range(k - 1):
            draft, hidden = self._draft_step(hidden, torch.tensor([[draft]], device=hidden.device))
            drafts.append(draft)
        return drafts

    def accept(self, num_accepted: int, verify: BaseOutput, new_tokens: list[int]) -> None:
        # drop the draft's cache entries for its own guesses; keep those fed with base features
        self.cache.crop(self.fed_with_base_features)
        self.features = self._features(verify)[:, : num_accepted + 1]
        self.next_tokens = torch.tensor([new_tokens], device=self.features.device)


class MedusaDrafter:
    """Chain drafts from ModelOpt's Medusa heads: head i reads the last hidden state and
    predicts the token i+1 places after the base model's own next token."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.hidden = None

    def start(self, prompt: torch.Tensor, prefill: BaseOutput, pending: int) -> None:
        self.hidden = prefill.last_hidden[:, -1:]

    def propose(self, k: int) -> list[int]:
        if k > len(self.model.medusa_heads):
            raise ValueError(
                f"num_draft_tokens={k} needs {k} Medusa heads; the model has {len(self.model.medusa_heads)}.")
        return [int(self.model.medusa_heads[i](self.hidden)[0, -1].argmax()) for i in range(k)]

    def accept(self, num_accepted: int, verify: BaseOutput, new_tokens: list[int]) -> None:
        self.hidden = verify.last_hidden[:, num_accepted : num_accepted + 1]


class ReferenceDrafter:
    """Drafts a known token sequence (the base model's own greedy output): every draft is
    accepted, so the acceptance length is k + 1. The oracle that checks the decoding loop."""

    def __init__(self, reference: list[int]):
        self.reference = reference
        self.emitted = 0

    def start(self, prompt: torch.Tensor, prefill: BaseOutput, pending: int) -> None:
        self.emitted = 1

    def propose(self, k: int) -> list[int]:
        drafts = self.reference[self.emitted : self.emitted + k]
        return drafts + [0] * (k - len(drafts))

    def accept(self, num_accepted: int, verify: BaseOutput, new_tokens: list[int]) -> None:
        self.emitted += len(new_tokens)


def drafter_for(model: torch.nn.Module) -> Drafter:
    """The drafter of a model converted by ModelOpt's speculative plugins."""
    if hasattr(model, "eagle_module"):
        return EagleDrafter(model)
    if hasattr(model, "medusa_heads"):
        return MedusaDrafter(model)
    raise ValueError("the model has no draft heads (neither EAGLE nor Medusa); convert it first.")
