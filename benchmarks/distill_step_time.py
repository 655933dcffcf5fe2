"""Step time of distillation vs its parts, on an otherwise idle machine: one KD optimizer step
against (student forward+backward + teacher forward) on the same micro-batches.

    .venv/bin/python -m benchmarks.distill_step_time --student PATH    # a pruned SmolLM2 student

Writes benchmarks/results/distill_step_time.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.distillation.config import load_distillation_config
from nemo_optim.distillation.model import DistillationLossReduction, build_distillation_model, teacher_provider
from nemo_optim.models.forward import make_batch, run_schedule
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.training import lm_loss_reduction

TEACHER = SMOLLM2


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    results_arguments(parser)
    args = parser.parse_args()
    with runtime.parallel_runtime():
        student = load_model(args.student)
        tokenizer = load_tokenizer(student.hf_dir)
        teacher = teacher_provider(None, TEACHER, tokenizer=tokenizer)
        rows = packed_sequences(DataConfig(seq_length=args.seq_length), "train", tokenizer,
                                args.micro_batch * args.micro_batches)
        batches = [make_batch(chunk) for chunk in rows.split(args.micro_batch)]
        common = dict(num_micro_batches=len(batches), seq_length=args.seq_length, micro_batch_size=args.micro_batch,
                      with_labels=True)

        def student_step():
            student.model.zero_grad(set_to_none=True)
            run_schedule(student.model, batches, lm_loss_reduction, forward_only=False, **common)

        def teacher_forward():
            run_schedule(teacher, batches, lm_loss_reduction, forward_only=True, **common)

        student.model.train()
        student_seconds = _timed(student_step, args.repeats)
        teacher_seconds = _timed(teacher_forward, args.repeats)
        config = load_distillation_config(None)
        model = build_distillation_model(student.model, teacher, config, student.config, student.config)
        model.train()
        loss = DistillationLossReduction(model, config)

        def kd_step():
            model.zero_grad(set_to_none=True)
            run_schedule(model, batches, loss, forward_only=False, **common)

        kd_seconds = _timed(kd_step, args.repeats)
    ratio = kd_seconds / (student_seconds + teacher_seconds)
    rows = [
        {"part": "student forward+backward (CE)", "seconds": student_seconds},
        {"part": "teacher forward", "seconds": teacher_seconds},
        {"part": "sum of the parts", "seconds": student_seconds + teacher_seconds},
        {"part": "KD step (ModelOpt DistillationModel, logit KL)", "seconds": kd_seconds, "ratio": ratio},
    ]
    notes = (f"Median of {args.repeats} after a warm-up; {args.micro_batches} micro-batches of {args.micro_batch} x "
             f"{args.seq_length} tokens; student {args.student} ({student.config.num_parameters() / 1e6:.1f} M), "
             f"teacher "
             f"{TEACHER}; fp32 on CPU, {torch.get_num_threads()} threads. Optimizer time excluded from all rows. "
             f"Goal: ratio <= 1.10.")
    write_results("distill_step_time", rows, [("part", "part"), ("seconds", "seconds"), ("ratio", "KD / parts")],
                  f"{notes} {args.note}".strip(), args.out)


if __name__ == "__main__":
    main()
