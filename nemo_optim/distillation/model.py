"""Teacher loading, the distillation model and its loss reduction.

The pieces NeMo 2 carried as copies (`DistillationGPTModel`, `_DistillationLossReduction`,
`adjust_distillation_model_for_mcore`, `get_tensor_shapes_adjust_fn_for_distillation`) are
ModelOpt's maintained implementations here: `mtd.convert` with the criterion and balancer from
`setup_distillation_config`, then `adjust_distillation_model_for_mcore`.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Callable

import torch
from modelopt.torch.distill.plugins.megatron import DistillationConfig, adjust_distillation_model_for_mcore

from nemo_optim import runtime
from nemo_optim.distillation.config import DistillationConfigError, validate_layer_names
from nemo_optim.models.config import GPTModelConfig
from nemo_optim.models.loader import load_model, load_tokenizer

__all__ = [
    "DistillationLossReduction",
    "adjust_distillation_model_for_mcore",
    "build_distillation_model",
    "check_same_tokenizer",
    "get_tensor_shapes_adjust_fn_for_distillation",
    "teacher_provider",
]

_ADJUSTED_METHODS = ("sharded_state_dict", "compute_language_model_loss", "set_student_input_tensor_shape",
                     "set_input_tensor", "forward")

# Shapes a student must share with its teacher for logit distillation.
_SHARED_FIELDS = ("vocab_size",)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Logit KD compares distributions token id by token id: both sides must use one vocabulary."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda kv: kv[1])[:3]
        raise DistillationConfigError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
            f"e.g. {differing}); logit distillation needs the same tokenizer: use a student derived from "
            f"the teacher (pruned or quantized) or pass tokenizer_path of the shared tokenizer."
        )


def teacher_provider(
    config: GPTModelConfig | None,
    ckpt_path: str | Path,
    tokenizer=None,
    dtype: str | None = None,
    transformer_impl: str | None = None,
) -> torch.nn.Module:
    """The frozen teacher: this rank's shard of the model at `ckpt_path` (native checkpoint, HF
    directory, .gguf or embedded name) in eval mode with no gradients.

    `config`, if given, must describe the same model (checked, not applied). `tokenizer`, if
    given (the student's), must equal the teacher's tokenizer.
    """
    loaded = load_model(ckpt_path, dtype=dtype, transformer_impl=transformer_impl)
    if config is not None:
        mismatched = {f.name: (getattr(config, f.name), getattr(loaded.config, f.name))
                      for f in dataclasses.fields(GPTModelConfig)
                      if f.name not in ("dtype", "transformer_impl")
                      and getattr(config, f.name) != getattr(loaded.config, f.name)}
        if mismatched:
            raise DistillationConfigError(f"teacher at {ckpt_path}: config differs from the given one: {mismatched}.")
    if tokenizer is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(loaded.hf_dir))
    teacher = loaded.model
    teacher.eval()
    teacher.requires_grad_(False)
    del loaded
    # loading leaves the checkpoint's tensors and HF state dicts behind until collected
    gc.collect()
    if runtime.use_cuda():
        torch.cuda.empty_cache()
    return teacher


def build_distillation_model(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    distillation_config: DistillationConfig,
    student_config: GPTModelConfig,
    teacher_config: GPTModelConfig,
) -> torch.nn.Module:
    """`mtd.DistillationModel` around `student`, adjusted for megatron (teacher hidden from
    checkpoints, teacher LM loss skipped, PP tensor concatenation)."""
    import modelopt.torch.distill as mtd
    from modelopt.torch.distill.plugins.megatron import setup_distillation_config

    for field in _SHARED_FIELDS:
        if getattr(student_config, field) != getattr(teacher_config, field):
            raise DistillationConfigError(
                f"student {field}={getattr(student_config, field)} but teacher "
                f"{field}={getattr(teacher_config, field)}; "
                f"logit distillation needs the same vocabulary."
            )
    validate_layer_names(distillation_config, student, teacher, student_config.num_layers, teacher_config.num_layers)
    distillation_config = setup_distillation_config(distillation_config, student.config, teacher.config)
    model = mtd.convert(student, mode=[("kd_loss", {
        "teacher_model": teacher,
        "criterion": distillation_config.criterion,
        "loss_balancer": distillation_config.loss_balancer,
    })])
    adjust_distillation_model_for_mcore(model, distillation_config)
    _lm_loss_on_a_copy_of_the_logits(model, distillation_config.skip_lm_loss)
    return model


def _lm_loss_on_a_copy_of_the_logits(model: torch.nn.Module, skip_lm_loss: bool) -> None:
    """megatron's vocab-parallel cross-entropy overwrites the logits in place (shift, exp), but
    the KD loss reads them afterwards (captured by a hook): give the LM loss a copy whenever it
    is computed (always in eval mode; in training unless skip_lm_loss)."""
    adjusted = model.compute_language_model_loss

    def compute_language_model_loss(labels, logits):
        if skip_lm_loss and model.training:
            return adjusted(labels, logits)  # returns zeros without reading the logits
        return adjusted(labels, logits.clone())

    model.compute_language_model_loss = compute_language_model_loss


def export_student(model: torch.nn.Module) -> torch.nn.Module:
    """The trained student without teacher, hooks or loss modules (its own ModelOpt state, e.g.
    quantizers after QAD, is kept)."""
    import modelopt.torch.distill as mtd

    student = mtd.export(model)
    # adjust_distillation_model_for_mcore patched these onto the instance; export restores the
    # class but not them (they would still look for the teacher)
    for name in _ADJUSTED_METHODS:
        student.__dict__.pop(name, None)
    return student


def get_tensor_shapes_adjust_fn_for_distillation(
    model: torch.nn.Module | list[torch.nn.Module],
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: int | None = None,
    forward_only: bool = False,
) -> Callable | None:
    """NeMo 2's signature over ModelOpt's implementation: the function that widens the tensors
    sent between pipeline stages to carry student and teacher activations (None at PP=1).
    `forward_only` is accepted for compatibility; the shapes do not depend on it."""
    from modelopt.torch.distill.plugins import megatron as mtd_megatron

    del forward_only
    return mtd_megatron.get_tensor_shapes_adjust_fn_for_distillation(
        model, seq_length=seq_length, micro_batch_size=micro_batch_size, decoder_seq_length=decoder_seq_length,
    )


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token.float() * mask).sum() / mask.sum()


def _reduce_kd_loss(loss_output, mask: torch.Tensor) -> torch.Tensor:
    """A distillation loss's `[B, S]` per-token values -> the mean over real tokens, summed over
    TP ranks when each holds a part of the vocabulary (ModelOpt's `tp_reduce` flag)."""
    from megatron.core import parallel_state, tensor_parallel

    if not isinstance(loss_output, tuple):
        return _masked_mean(loss_output, mask)
    per_token, tp_reduce, is_sequence_parallel = loss_output
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if is_sequence_parallel and tp_size > 1:
        # this rank holds a slice of the sequence: sum locally, gather the sums (autograd-aware)
        local_mask = mask.chunk(tp_size, dim=1)[parallel_state.get_tensor_model_parallel_rank()]
        local_sum = (per_token.float() * local_mask).sum().reshape(1)
        value = tensor_parallel.gather_from_tensor_model_parallel_region(local_sum).sum() / mask.sum()
    else:
        value = _masked_mean(per_token, mask)
    if tp_reduce and tp_size > 1:
        value = tensor_parallel.gather_from_tensor_model_parallel_region(value.reshape(1)).sum()
    return value


class DistillationLossReduction:
    """The schedule's loss function for a distillation model: per-token LM loss and KD losses
    averaged over the loss mask, balanced by ModelOpt's balancer, and each part reported."""

    def __init__(self, model: torch.nn.Module, distillation_config: DistillationConfig):
        self.model = model
        self.skip_lm_loss = distillation_config.skip_lm_loss

    def __call__(self, batch: dict[str, torch.Tensor], output: torch.Tensor):
        mask = batch["loss_mask"]
        lm_loss = _masked_mean(output, mask)
        losses = self.model.compute_kd_loss(student_loss=lm_loss, loss_reduction_fn=lambda x: _reduce_kd_loss(x, mask))
        total = losses["kd_loss"]
        # clones: megatron's schedule divides the returned loss in place by the micro-batch count
        metrics = {"loss": total.detach().clone(), "logits_loss": losses["logits_loss"].detach().clone(),
                   "intermediate_loss": torch.as_tensor(losses["intermediate_loss"]).detach().clone()}
        if not (self.skip_lm_loss and self.model.training):  # otherwise the LM loss was not computed
            metrics["lm_loss"] = lm_loss.detach().clone()
        return total, metrics
