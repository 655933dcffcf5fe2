"""Runs `distill` on tiny models (under torchrun or alone), optionally SIGKILLing itself
after a given optimizer step or in the middle of a checkpoint save."""

import argparse
import os
import signal

import torch

import nemo_optim.stages.distill as distill_module
from nemo_optim import training
from nemo_optim.data.corpus import DataConfig


def _kill_after_step(kill_step):
    def on_step_end(step):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step_end


def _kill_inside_save(kill_step):
    # every rank file of this step's checkpoint is written, the directory is not yet complete
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    training.torch.save = save


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", default=None)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint-interval", type=int, default=2)
    parser.add_argument("--kill-after-step", type=int, default=None)
    parser.add_argument("--kill-inside-save", type=int, default=None)
    args = parser.parse_args()
    if args.kill_after_step is not None:
        real_train = distill_module.train
        distill_module.train = lambda *a, **k: real_train(*a, **k, on_step_end=_kill_after_step(args.kill_after_step))
    if args.kill_inside_save is not None:
        _kill_inside_save(args.kill_inside_save)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distill_module.distill(
        model_path=args.student, teacher_model_path=args.teacher, output_path=args.output,
        distillation_config_path=args.config, devices=world, tp_size=args.tp, pp_size=args.pp, overwrite=True,
        data=DataConfig(seq_length=32),
        training=training.TrainingConfig(max_steps=args.steps, global_batch_size=4, micro_batch_size=2, lr=3e-3,
                                         warmup_steps=2, log_interval=1, val_check_interval=3, num_val_sequences=4,
                                         checkpoint_interval=args.checkpoint_interval),
    )
