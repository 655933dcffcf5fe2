"""Memory of ModelOpt's auto_quantize sensitivity pass on megatron's GPTModel.

For each step, ModelOpt's gradient scoring runs a forward + backward and keeps, for every
quantizable linear layer, its output error under each candidate format until that layer's
output gradient arrives. With plain autograd that is the whole model's activations plus every
layer's errors at once (SmolLM2, 4 rows x 256 tokens: ~9x the fp32 weights). ModelOpt ships the
remedy for Hugging Face models and a hook for others (`register_custom_support`): recompute in
backward (its scoring forward skips the errors when grad is off, i.e. in a reentrant checkpoint's
first pass) and gradients for activations only. This module registers the same for megatron's
GPTModel, recomputing one decoder layer at a time and dropping a layer's errors once its scores
are added, and gives the search steps (`forward_step`, `forward_backward_step`) that backward one
row at a time and never hold a row's whole `[S, vocab]` logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from nemo_optim import compat
from nemo_optim.models.forward import output_layer_skipped

_registered = False
LOSS_CHUNK_TOKENS = 64
"""Tokens whose logits exist at once in the search's loss (SmolLM2: 64 x 49k vocab = 12 MiB)."""


def forward_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """ModelOpt's `forward_step` (the search's calibration passes): the decoder's final hidden
    states `[S, B, H]`, without the output layer."""
    with output_layer_skipped(model):
        return model(batch["input_ids"], batch["position_ids"], None)


def forward_backward_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """ModelOpt's `forward_backward_step` (the sensitivity pass): the gradient of the batch's mean
    next-token loss, one row at a time. A score sums (output gradient x output error)^2 over
    elements and a row's gradients do not depend on the other rows, so the scores equal one
    backward of the whole batch; memory is one row's."""
    tokens = batch["labels"].numel()
    for row in range(batch["labels"].shape[0]):
        one_row = {key: value[row:row + 1] for key, value in batch.items()}
        (_summed_loss(model, forward_step(model, one_row), one_row["labels"]) / tokens).backward()


def _summed_loss(model: torch.nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over chunks of sequence positions, each chunk's logits
    recomputed in backward: whole logits, their softmax and gradient would be 3 x 48 MiB per
    256-token row on SmolLM2's 49k vocabulary."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from torch.utils.checkpoint import checkpoint

    output_weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                     else model.output_layer.weight).detach()  # the scores need activation gradients only
    labels = labels.transpose(0, 1).contiguous()  # [S, B], as the hidden states

    def chunk_loss(hidden, chunk_labels):
        logits, _ = model.output_layer(hidden, weight=output_weight)
        return vocab_parallel_cross_entropy(logits.float(), chunk_labels).sum()

    positions = max(1, LOSS_CHUNK_TOKENS // labels.shape[1])
    return sum(checkpoint(chunk_loss, hidden, chunk_labels, use_reentrant=False)
               for hidden, chunk_labels in zip(hidden_states.split(positions), labels.split(positions)))


def _is_megatron_gpt(model: torch.nn.Module) -> bool:
    from megatron.core.models.gpt import GPTModel

    return isinstance(model, GPTModel)


def _drop_output_errors(layer: torch.nn.Module) -> None:
    # ModelOpt's scoring forward stores a module's per-format output errors and reads them only
    # in that module's backward hook
    for module in layer.modules():
        compat.drop_auto_quantize_output_errors(module)


def _checkpointed_forward(layer: torch.nn.Module):
    forward = layer.forward

    def run(hidden_states, *args, **kwargs):
        def layer_forward(hidden_states):
            if torch.is_grad_enabled():  # the recompute in backward
                # the input's gradient is complete only after every module inside has had its
                # backward hook, so the layer's errors are no longer needed then
                hidden_states.register_hook(lambda grad: _drop_output_errors(layer))
            return forward(hidden_states, *args, **kwargs)

        # reentrant, as ModelOpt enables for Hugging Face models: the first pass runs without
        # grad, so ModelOpt computes a layer's errors only in its recompute
        return torch.utils.checkpoint.checkpoint(layer_forward, hidden_states, use_reentrant=True)

    return run


@contextlib.contextmanager
def recompute_decoder_layers(model: torch.nn.Module) -> Iterator[None]:
    """Each decoder layer of `model` recomputed in backward, one at a time. Not megatron's own
    `recompute_granularity="full"`: its checkpoint saves the CUDA RNG state, which a CPU-only
    torch cannot read, and it needs the model in training mode."""
    layers = list(model.decoder.layers)
    own_forwards = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = _checkpointed_forward(layer)
    gradient_source = model.embedding.register_forward_hook(_embeddings_need_gradient)
    try:
        yield
    finally:
        gradient_source.remove()
        for layer, own in zip(layers, own_forwards):
            del layer.forward
            if own is not None:
                layer.forward = own
            _drop_output_errors(layer)


def _embeddings_need_gradient(module, args, output):
    # every activation downstream then gets its gradient, while no weight needs one (ModelOpt's
    # Hugging Face support enables the embedding weight's: a dense [vocab, hidden] gradient
    # per step, thrown away)
    return output.detach().requires_grad_() if torch.is_grad_enabled() else output


def _no_weight_gradients(name: str, model: torch.nn.Module) -> bool:
    return False


def register_megatron_scoring() -> None:
    """Registers `recompute_decoder_layers` with ModelOpt's gradient auto_quantize for
    megatron's GPTModel (once per process)."""
    global _registered
    if _registered:
        return
    compat.register_auto_quantize_support_first(_is_megatron_gpt, recompute_decoder_layers, _no_weight_gradients)
    _registered = True
