"""The training loop against absolute references: a plain PyTorch loop on the transformers model
(same data, AdamW, clipping and schedule), pinned first losses, and megatron's own LR scheduler.
Every other training test compares runs of this loop with each other, which a bug common to all
runs would pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from nemo_optim import runtime
from nemo_optim.models.loader import load_model
from nemo_optim.training import TrainingConfig, learning_rate_scheduler, lm_loss_reduction, train

CONFIG = TrainingConfig(max_steps=4, global_batch_size=4, micro_batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                        weight_decay=0.01, clip_grad=0.5, val_check_interval=0, checkpoint_interval=0, log_interval=1,
                        seed=0)
# nemo-optim's losses of the first 4 steps on the tiny Llama (tests/tiny_models.py, seed 0) at seed 0;
# recorded with torch 2.13 / megatron-core 0.16.1 on CPU in fp32
PINNED_LOSSES = [6.249041795730591, 6.14681339263916, 5.97808313369751, 5.838500022888184]


def _tokens() -> torch.Tensor:
    # exactly one global batch: every step trains on all rows, so the sample order does not matter
    return torch.randint(0, 512, (CONFIG.global_batch_size, 33), generator=torch.Generator().manual_seed(0))


def _plain_pytorch_losses(hf_dir) -> list[float]:
    """The same training written out by hand on transformers' model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1], "weight_decay": CONFIG.weight_decay},
         {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
        lr=CONFIG.lr, betas=(CONFIG.adam_beta1, CONFIG.adam_beta2))
    tokens, losses = _tokens(), []
    for step in range(CONFIG.max_steps):
        if step < CONFIG.warmup_steps:
            lr = CONFIG.lr * (step + 1) / CONFIG.warmup_steps
        else:
            progress = (step - CONFIG.warmup_steps) / (CONFIG.max_steps - CONFIG.warmup_steps)
            lr = CONFIG.min_lr + (CONFIG.lr - CONFIG.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        logits = model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CONFIG.clip_grad)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_equals_a_plain_pytorch_loop_and_the_pinned_losses(tiny_hf_models, tmp_path):
    with runtime.parallel_runtime():
        model = load_model(tiny_hf_models["llama"]).model
        result = train(model, _tokens(), None, lm_loss_reduction, CONFIG, tmp_path / "run", resume=False)
    ours = [row["loss"] for row in result.history if row["kind"] == "train"]
    plain = _plain_pytorch_losses(tiny_hf_models["llama"])
    assert len(ours) == CONFIG.max_steps
    assert max(abs(a - b) for a, b in zip(ours, plain)) < 1e-4, (ours, plain)
    assert ours[-1] < ours[0] - 0.2  # it learns: clipping and the schedule are not zeroing the updates
    assert ours == pytest.approx(PINNED_LOSSES, abs=1e-5)


def test_lr_curve_is_megatrons_warmup_cosine_schedule():
    """Against megatron-core's OptimizerParamScheduler (cosine decay to min_lr): nemo-optim's step k
    uses megatron's lr after k+1 scheduler steps during warmup (it never trains at lr 0) and after
    k steps from the end of warmup on, so both reach the peak at the warmup's end and min_lr at
    max_steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = TrainingConfig(max_steps=50, warmup_steps=5, lr=3e-4, min_lr=3e-5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    megatron = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=config.lr, min_lr=config.min_lr, lr_warmup_steps=config.warmup_steps,
        lr_decay_steps=config.max_steps, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=1,
        wd_incr_style="constant")
    megatron_lr = []
    for _ in range(config.max_steps + 1):
        megatron_lr.append(optimizer.param_groups[0]["lr"])
        megatron.step(1)
    ours_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler, ours = learning_rate_scheduler(ours_optimizer, config), []
    for _ in range(config.max_steps + 1):
        ours.append(ours_optimizer.param_groups[0]["lr"])
        ours_optimizer.step()
        scheduler.step()
    for step, lr in enumerate(ours):
        expected = megatron_lr[step + 1] if step < config.warmup_steps else megatron_lr[step]
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    assert max(ours) == pytest.approx(config.lr) and ours[-1] == pytest.approx(config.min_lr)
