"""A small training loop on megatron's schedules, shared by distillation and plain fine-tuning.

Micro-batches with gradient accumulation to a global batch, AdamW, linear warmup + cosine LR (torch),
global-norm gradient clipping across TP/PP, validation every N steps, TensorBoard + console
logging, and checkpoints every N steps holding everything a bit-exact resume needs (model,
optimizer, scheduler, RNG states, the data position and the metrics so far).

Training checkpoints hold a megatron model's weights and AdamW moments as a dist-checkpoint
(`state/`), so a run resumes at another TP/PP too (bit-exact at the same layout), plus small
per-rank files (scheduler, RNG states). The stage's final model is a native checkpoint.

    <run_dir>/checkpoints/step_0000050/state/  rank00000.pt ...  meta.json
    <run_dir>/metrics.jsonl      one JSON line per logged train step and per validation
    <run_dir>/tensorboard/
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads TrainingConfig.

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from nemo_optim import checkpoint, cpu, runtime
from nemo_optim.errors import InputError
from nemo_optim.models import sharded
from nemo_optim.models.forward import LossFn, make_batch, run_schedule

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class TrainingConfigError(InputError):
    """A training setting that cannot work, with what to change."""


@dataclasses.dataclass
class TrainingConfig:
    """How long and how to train. Batch sizes are in sequences of `data.seq_length` tokens."""

    max_steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    val_check_interval: int = 25
    """Validate every N steps (and after the last step); 0 disables."""
    num_val_sequences: int = 16
    checkpoint_interval: int = 25
    """Save a resumable checkpoint every N steps; 0 disables."""
    keep_last_checkpoints: int = 2
    log_interval: int = 5
    seed: int = 1234
    precision: str = "auto"
    """`fp32`, `bf16` (autocast, CUDA only) or `auto` (bf16 on CUDA, fp32 on CPU)."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "num_val_sequences", "log_interval"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("warmup_steps", "val_check_interval", "checkpoint_interval", "keep_last_checkpoints"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must not be negative")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            errors.append(f"lr={self.lr}, min_lr={self.min_lr}: need 0 < lr and 0 <= min_lr <= lr")
        if self.precision not in ("auto", "fp32", "bf16"):
            errors.append(f"precision={self.precision!r}: use auto, fp32 or bf16")
        if errors:
            raise TrainingConfigError("TrainingConfig: " + "; ".join(errors) + ".")

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        per_rank, rest = divmod(self.global_batch_size, data_parallel_size * self.micro_batch_size)
        if rest or per_rank == 0:
            raise TrainingConfigError(
                f"TrainingConfig: global_batch_size={self.global_batch_size} must be a multiple of "
                f"micro_batch_size={self.micro_batch_size} x data-parallel size {data_parallel_size}."
            )
        return per_rank

    def use_bf16(self) -> bool:
        if self.precision == "bf16" and not runtime.use_cuda():
            raise TrainingConfigError("TrainingConfig: precision='bf16' needs CUDA; use 'fp32' or 'auto' on CPU.")
        return self.precision == "bf16" or (self.precision == "auto" and runtime.use_cuda())


def learning_rate_scheduler(optimizer: torch.optim.Optimizer,
                            config: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers for linear warmup to `lr` (step k of W trains at lr * (k+1)/W, never
    at 0), then cosine decay to `min_lr` at `max_steps`; stepped once per optimizer step."""
    from torch.optim import lr_scheduler

    warmup = config.warmup_steps
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.max_steps - warmup, 1), eta_min=config.min_lr)
    if warmup == 0:
        return cosine
    ramp = (lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
            if warmup > 1 else lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=1))
    return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def lm_loss_reduction(batch: dict[str, torch.Tensor], output: torch.Tensor):
    """Plain next-token cross-entropy: the model's per-token loss averaged over the loss mask."""
    mask = batch["loss_mask"]
    loss = (output.float() * mask).sum() / mask.sum()
    # clones: megatron's schedule divides the returned loss in place by the micro-batch count
    return loss, {"loss": loss.detach().clone(), "lm_loss": loss.detach().clone()}


@dataclasses.dataclass
class TrainingResult:
    steps: int
    resumed_from: Optional[int]
    history: list
    """Every logged train step and validation, as written to metrics.jsonl."""
    seconds_per_step: float
    """Mean wall time of the optimizer steps this process ran (validation excluded)."""

    def last(self, kind: str) -> dict:
        rows = [row for row in self.history if row["kind"] == kind]
        return rows[-1] if rows else {}


class _SampleOrder:
    """Which training row is the i-th sample: a fresh seeded permutation each epoch, so the
    order only depends on (seed, i) and a resumed run reads exactly what the first one would."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed
        self._epoch, self._order = -1, None

    def __getitem__(self, index: int) -> int:
        epoch, position = divmod(index, self.num_rows)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_rows, generator=generator)
        return int(self._order[position])


def _trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _is_megatron(model: torch.nn.Module) -> bool:
    from megatron.core.transformer.module import MegatronModule

    return isinstance(model, MegatronModule)


class _GradientSync:
    """Gradients summed where megatron-core sums them. A megatron model trains inside megatron's
    DistributedDataParallel (contiguous gradient buffers) and `finalize_model_grads` averages
    over data-parallel replicas and sums the tied embedding / output weight across the first and
    last pipeline stage. A model outside megatron (speculative's transformers base + draft) only
    needs its gradients averaged over the data-parallel replicas."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter]):
        self.params = params
        self.ddp = None
        self.model = model  # what the schedule runs
        if _is_megatron(model):
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            self.ddp = self.model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)

    def zero(self) -> None:
        for param in self.params:
            param.grad = None  # the backward hooks accumulate into the buffer, not into .grad
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()

    def finalize(self) -> None:
        """After the step's micro-batches: reduced gradients in every `param.grad`."""
        from megatron.core import parallel_state

        if self.ddp is not None:
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads([self.ddp])
            for param in self.params:
                param.grad = param.main_grad
            return
        replicas = parallel_state.get_data_parallel_world_size()
        if replicas > 1:
            for param in self.params:
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad, group=parallel_state.get_data_parallel_group())
                    param.grad /= replicas


def _clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clips to a global norm over the whole model: megatron's norm over all TP/PP ranks
    (TP-replicated and pipeline-tied copies counted once), torch's in-place scaling. Returns
    the norm before clipping."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    grads = [p.grad for p in params
             if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    norm = get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm,
                                             torch.tensor(norm, device=runtime.device()))
    return float(norm)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if runtime.use_cuda() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and runtime.use_cuda():
        torch.cuda.set_rng_state_all(state["cuda"])


def _layout() -> dict:
    from megatron.core import parallel_state

    return {"world_size": runtime.world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size()}


def default_run_dir(output_path: str) -> Path:
    """Where a stage's training checkpoints, metrics.jsonl and TensorBoard logs go unless given."""
    path = Path(output_path)
    return path.parent / f"{path.name}_run"


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete training checkpoint. Saves are written to a hidden `.partial`
    directory and renamed when every rank has finished, so a killed save is never found here."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    steps = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def _sharded_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A megatron model's weights and AdamW moments as megatron sharded tensors (each moment keyed
    like its parameter), so dist-checkpointing saves them once and reshards them on load: a run
    resumes at another TP/PP. AdamW's step count is the training step (restored from it)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    model_state = sharded.sharded_state_dict(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:  # a template to load into needs the moments before the first step
        if not optimizer.state[param]:
            optimizer.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                          exp_avg_sq=torch.zeros_like(param))
    optimizer_state = optimizer.state_dict()  # its param_groups stay each rank's own (not persisted)
    optim_state_to_sharding_state(optimizer_state, get_param_id_to_sharded_param_map(model_state, params),
                                  exclude_keys=("step",))
    return {"model": model_state, "optimizer": optimizer_state}


def _save_training_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, history, keep: int,
                              fingerprint: dict) -> None:
    """A megatron model's weights and optimizer moments go into a dist-checkpoint (`state/`); a
    model outside megatron (replicated on every rank) into rank 0's file. Every rank's file keeps
    what is not sharded: scheduler, hyperparameters, RNG states."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    with checkpoint.atomic_directory(root / f"step_{step:07d}") as tmp:
        extras = {"scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step}
        if _is_megatron(model):
            checkpoint.fork_writer_results_queue()
            if runtime.is_main_process():
                (tmp / "state").mkdir()
            runtime.barrier()
            checkpoint.save_dist_checkpoint(_sharded_training_state(model, optimizer), tmp / "state")
        elif runtime.is_main_process():
            extras.update(model=model.state_dict(), optimizer=optimizer.state_dict())
        torch.save(extras, tmp / f"rank{runtime.rank():05d}.pt")
        runtime.barrier()
        if runtime.is_main_process():
            # meta.json last: with it the directory is complete (and the rename makes it visible)
            (tmp / "meta.json").write_text(json.dumps({"step": step, "layout": _layout(), "fingerprint": fingerprint,
                                                          "history": history}) + "\n")
    if runtime.is_main_process() and keep:
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()


def _settings_changed(path: Path, fingerprint: dict) -> list[str]:
    """Which settings of this run differ from the ones the checkpoint at `path` was made with."""
    saved = json.loads((path / "meta.json").read_text()).get("fingerprint", {})
    return sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))


def _load_training_checkpoint(path: Path, model, optimizer, scheduler, seed: int) -> tuple[int, list]:
    """Restores a training checkpoint; a megatron model's weights and moments are resharded to
    this run's TP/PP. RNG states are restored when the layout is the one saved (a bit-exact
    resume), otherwise reseeded from (seed, step)."""
    meta = json.loads((path / "meta.json").read_text())
    step = meta["step"]
    same_layout = meta["layout"] == _layout()
    if not _is_megatron(model) and meta["layout"]["world_size"] != runtime.world_size():
        raise TrainingConfigError(
            f"{path}: saved by {meta['layout']['world_size']} processes, this run has {runtime.world_size()}; resume "
            f"with the same processes, or start fresh with resume=False.")
    extras = torch.load(path / f"rank{runtime.rank() if same_layout else 0:05d}.pt", weights_only=False,
                        map_location=runtime.device())
    if _is_megatron(model):
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(_sharded_training_state(model, optimizer), str(path / "state"))
        model.load_state_dict(loaded["model"], strict=False)
        for param_state in loaded["optimizer"]["state"].values():
            param_state["step"] = torch.tensor(float(step))
        optimizer.load_state_dict(loaded["optimizer"])
    else:  # replicated on every rank: rank 0's file holds it
        replicated = extras if runtime.is_main_process() else torch.load(
            path / "rank00000.pt", weights_only=False, map_location=runtime.device())
        model.load_state_dict(replicated["model"])
        optimizer.load_state_dict(replicated["optimizer"])
    scheduler.load_state_dict(extras["scheduler"])
    if same_layout:
        _set_rng_state(extras["rng"])
    else:
        runtime.print0(f"{path}: saved with {meta['layout']}, resuming with {_layout()} (weights and optimizer "
                       f"moments resharded; random states reseeded)")
        runtime.seed_everything(seed + step)
    return step, meta["history"]


class _Log:
    """metrics.jsonl + TensorBoard + console, on the main process only."""

    def __init__(self, run_dir: Path, history: list, enabled: bool):
        self.enabled = enabled
        self.history = history
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            # rewritten from the checkpoint's history: steps after the resumed one never happened
            with (run_dir / METRICS_FILE).open("w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in history)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional; metrics.jsonl has everything
                self.writer = None
        self.run_dir = run_dir

    def record(self, row: dict) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        with (self.run_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _mean_metrics(outputs: list[dict]) -> dict:
    """Averages each reported scalar over micro-batches (last pipeline stage) and the
    data-parallel replicas; every rank gets the result."""
    from megatron.core import parallel_state

    from nemo_optim.models.forward import broadcast_from_last_stage

    keys = sorted(outputs[0]) if outputs else []
    values = torch.tensor([float(sum(float(o[k]) for o in outputs) / len(outputs)) for k in keys], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1 and len(keys):
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    return broadcast_from_last_stage(dict(zip(keys, values.tolist())))


def _adamw(params: list[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
        lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


def _resume_or_start(run_dir: Path, resume: bool, fingerprint: dict, model, optimizer, scheduler,
                     seed: int) -> tuple[int, list]:
    """(first step, metrics so far): from the newest complete checkpoint made with the same
    settings, else a fresh, seeded start (older checkpoints of this run_dir removed)."""
    newest = newest_checkpoint(run_dir) if resume else None
    changed = _settings_changed(newest, fingerprint) if newest is not None else []
    if changed:
        # continuing would mix two different runs: this one starts over
        runtime.print0(f"not resuming from {newest}: settings changed ({', '.join(changed)}); starting over")
        newest = None
    if newest is not None:
        step, history = _load_training_checkpoint(newest, model, optimizer, scheduler, seed)
        runtime.print0(f"resumed from {newest} (step {step})")
        return step, history
    if runtime.is_main_process():
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    runtime.barrier()
    runtime.seed_everything(seed)
    return 0, []


def _micro_batches(train_tokens: torch.Tensor, order: _SampleOrder, step: int, config: TrainingConfig,
                   dp_rank: int, num_micro: int) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's share of global batch `step`, in the seeded sample order."""
    first = step * config.global_batch_size + dp_rank * num_micro * config.micro_batch_size
    for m in range(num_micro):
        rows = [order[first + m * config.micro_batch_size + i] for i in range(config.micro_batch_size)]
        yield make_batch(train_tokens[rows])


def _validation_metrics(model: torch.nn.Module, val_tokens: torch.Tensor, loss_fn: LossFn, config: TrainingConfig,
                        forward_backward: Callable[..., list], adjust_tensor_shapes_fn: Optional[Callable]) -> dict:
    """Mean loss metrics (and perplexity) over `val_tokens`; leaves `model` in train mode."""
    model.eval()
    outputs = []
    with torch.no_grad(), _autocast(config):
        for start in range(0, len(val_tokens), config.micro_batch_size):
            batch = make_batch(val_tokens[start : start + config.micro_batch_size])
            outputs += forward_backward(model, [batch], loss_fn, num_micro_batches=1,
                                        seq_length=val_tokens.shape[1] - 1,
                                        micro_batch_size=config.micro_batch_size, forward_only=True, with_labels=True,
                                        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
    model.train()
    metrics = _mean_metrics(outputs)
    if "lm_loss" in metrics:
        metrics["perplexity"] = math.exp(min(metrics["lm_loss"], 50.0))
    return metrics


def _autocast(config: TrainingConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16) if config.use_bf16() else contextlib.nullcontext()


def train(
    model: torch.nn.Module,
    train_tokens: torch.Tensor,
    val_tokens: Optional[torch.Tensor],
    loss_fn: LossFn,
    config: TrainingConfig,
    run_dir: Path,
    resume: bool = True,
    adjust_tensor_shapes_fn: Optional[Callable] = None,
    on_step_end: Optional[Callable[[int], None]] = None,
    fingerprint: Optional[dict] = None,
    forward_backward: Callable[..., list] = run_schedule,
) -> TrainingResult:
    """Trains `model` in place on `[N, S+1]` token rows; every rank calls it.

    `loss_fn(batch, output)` gets the model's per-token LM loss as `output` (labels are passed
    to the model) and returns `(scalar loss, {name: scalar})`. `resume=True` continues from the
    newest complete checkpoint in `run_dir`, if there is one. `forward_backward` is megatron's
    schedule (`run_schedule`) or, for a model outside megatron, `run_micro_batches`.
    """
    from megatron.core import parallel_state

    run_dir = Path(run_dir)
    fingerprint = json.loads(json.dumps({**(fingerprint or {}), "training": dataclasses.asdict(config)}))
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), runtime.data_parallel_rank()
    num_micro = config.micro_batches_per_step(dp_size)
    seq_length = train_tokens.shape[1] - 1
    if val_tokens is not None:
        # whole micro-batches only: pipeline stages exchange tensors of one fixed shape
        val_tokens = val_tokens[: len(val_tokens) // config.micro_batch_size * config.micro_batch_size]
        if len(val_tokens) == 0:
            raise TrainingConfigError(f"TrainingConfig: num_val_sequences={config.num_val_sequences} is less than "
                                      f"micro_batch_size={config.micro_batch_size}.")

    params = _trainable_parameters(model)
    optimizer = _adamw(params, config)
    scheduler = learning_rate_scheduler(optimizer, config)
    gradients = _GradientSync(model, params)
    start_step, history = _resume_or_start(run_dir, resume, fingerprint, model, optimizer, scheduler, config.seed)
    resumed_from = start_step or None
    log = _Log(run_dir, history, enabled=runtime.is_main_process())
    order = _SampleOrder(len(train_tokens), config.seed)

    progress = None
    if runtime.is_main_process() and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
    step_seconds = []
    model.train()
    # big buffers (logits, gradients) are reused from step to step instead of faulted in afresh
    with cpu.large_buffers_kept_in_heap():
        for step in range(start_step, config.max_steps):
            began = time.perf_counter()
            gradients.zero()
            with _autocast(config):
                batches = _micro_batches(train_tokens, order, step, config, dp_rank, num_micro)
                outputs = forward_backward(gradients.model, batches, loss_fn, num_micro_batches=num_micro,
                                           seq_length=seq_length, micro_batch_size=config.micro_batch_size,
                                           forward_only=False, with_labels=True,
                                           adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
            gradients.finalize()
            grad_norm = _clip_gradients(params, config.clip_grad)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step_seconds.append(time.perf_counter() - began)
            done = step + 1
            if done % config.log_interval == 0 or done == config.max_steps:
                metrics = _mean_metrics(outputs)
                log.record({"kind": "train", "step": done, **metrics, "lr": lr, "grad_norm": grad_norm,
                            "seconds_per_step": step_seconds[-1]})
                text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                if progress is not None:
                    progress.set_postfix_str(text)
                else:
                    runtime.print0(f"step {done}/{config.max_steps}: {text}, lr {lr:.2e}, "
                                   f"{step_seconds[-1]:.2f} s/step")
            if progress is not None:
                progress.update(1)
            if val_tokens is not None and config.val_check_interval and (
                    done % config.val_check_interval == 0 or done == config.max_steps):
                metrics = _validation_metrics(gradients.model, val_tokens, loss_fn, config, forward_backward,
                                              adjust_tensor_shapes_fn)
                log.record({"kind": "validation", "step": done, **metrics})
                runtime.print0(f"validation step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if config.checkpoint_interval and (done % config.checkpoint_interval == 0 or done == config.max_steps):
                _save_training_checkpoint(run_dir, done, model, optimizer, scheduler, log.history,
                                          config.keep_last_checkpoints, fingerprint)
            if on_step_end is not None:
                on_step_end(done)
    if progress is not None:
        progress.close()
    log.close()
    model.eval()
    return TrainingResult(
        steps=config.max_steps, resumed_from=resumed_from, history=log.history,
        seconds_per_step=sum(step_seconds) / len(step_seconds) if step_seconds else float("nan"),
    )
