"""Distillation: nemo-optim's `distill` stage against the loop a user would write instead - the
same teacher and student as transformers models, a forward-KL logit loss, AdamW, in plain PyTorch.

Both sides: teacher SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32), student the
18-layer depth-pruned model of `make run` (outputs/compress_smollm2/pruned; the plain loop reads
its HF export), the same packed rows of the embedded corpus's train split in the same order
(nemo-optim's seeded sample order), 2 micro-batches of 2 x 256 tokens per step, AdamW (lr 1e-4
constant, betas 0.9/0.95, weight decay 0.01 on matrices), gradients clipped at 1.0, fp32 on CPU.
Each side runs in its own process (peak RSS is that process's; nemo-optim's started as its executors
start CPU jobs, with glibc's tcache off, the plain loop's in the plain environment); the two sides
alternate, --runs times each (this VM's speed drifts from minute to minute), and each
side's s/step is the median over its runs of the run's median step after the first.

    .venv/bin/python -m benchmarks.kd_vs_plain_loop
    .venv/bin/python -m benchmarks.kd_vs_plain_loop --steps 3       # smoke
Writes benchmarks/results/kd_vs_plain_loop.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import nemo_optim_process_env, results_arguments, write_results
from nemo_optim.models.hf import SMOLLM2

SEED, LR, WEIGHT_DECAY, BETAS, CLIP = 1234, 1e-4, 0.01, (0.9, 0.95), 1.0


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _train_rows(student_path: str, seq_length: int) -> torch.Tensor:
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.data.packing import packed_sequences
    from nemo_optim.models.loader import load_tokenizer, read_model_config

    hf_dir = read_model_config(student_path)[1]
    return packed_sequences(DataConfig(seq_length=seq_length), "train", load_tokenizer(hf_dir))


def run_nemo_optim(args) -> dict:
    from nemo_optim.distillation.config import load_distillation_config
    from nemo_optim.stages.distill import distill
    from nemo_optim.training import TrainingConfig

    output = Path(args.work_dir) / "nemo_optim_student"
    training = TrainingConfig(max_steps=args.steps, global_batch_size=args.micro_batch * args.micro_batches,
                              micro_batch_size=args.micro_batch, lr=LR, min_lr=LR, warmup_steps=0,
                              weight_decay=WEIGHT_DECAY, clip_grad=CLIP, val_check_interval=0, checkpoint_interval=0,
                              log_interval=1, seed=SEED)
    from nemo_optim.data.corpus import DataConfig

    distill(model_path=args.student, teacher_model_path=SMOLLM2, output_path=str(output),
            distillation_config=load_distillation_config({}), data=DataConfig(seq_length=args.seq_length),
            training=training, resume=False, overwrite=True)
    rows = [json.loads(line) for line in (Path(f"{output}_run") / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    return {"losses": [row["logits_loss"] for row in train], "step_seconds": [row["seconds_per_step"] for row in train],
            "peak_rss_gib": _peak_rss_gib()}


def run_plain_loop(args) -> dict:
    import transformers

    from nemo_optim.models.hf import gguf_to_hf
    from nemo_optim.models.loader import resolve_source

    torch.manual_seed(SEED)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(gguf_to_hf(resolve_source(SMOLLM2).path),
                                                                dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(args.student_hf, dtype=torch.float32).train()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in parameters if p.dim() > 1], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS)
    rows = _train_rows(args.student, args.seq_length)
    # nemo-optim's sample order: a permutation of the rows seeded with seed + epoch
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED))
    losses, step_seconds, per_step = [], [], args.micro_batch * args.micro_batches
    for step in range(args.steps):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(args.micro_batches):
            first = step * per_step + micro * args.micro_batch
            batch = rows[order[first : first + args.micro_batch]]
            inputs = batch[:, :-1]
            with torch.no_grad():
                teacher_logits = teacher(inputs).logits
            student_logits = student(inputs).logits
            # forward KL(teacher || student) per token, summed over the vocabulary, mean over tokens
            loss = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                            log_target=True, reduction="none").sum(-1).mean()
            (loss / args.micro_batches).backward()
            step_loss += loss.item() / args.micro_batches
        torch.nn.utils.clip_grad_norm_(parameters, CLIP)
        optimizer.step()
        step_seconds.append(time.perf_counter() - began)
        losses.append(step_loss)
        print(f"plain step {step + 1}: loss {step_loss:.4f}, {step_seconds[-1]:.2f} s", flush=True)
    return {"losses": losses, "step_seconds": step_seconds, "peak_rss_gib": _peak_rss_gib()}


def _side(args, side: str) -> dict:
    out = Path(args.work_dir) / f"{side}.json"
    command = [sys.executable, "-m", "benchmarks.kd_vs_plain_loop", "--side", side, "--student", args.student,
               "--student-hf", args.student_hf, "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
               "--micro-batches", str(args.micro_batches), "--seq-length", str(args.seq_length),
               "--work-dir", args.work_dir]
    subprocess.run(command, check=True, env=nemo_optim_process_env() if side == "nemo_optim" else None)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="outputs/compress_smollm2/pruned",
                        help="nemo-optim checkpoint of the student")
    parser.add_argument("--student-hf", default=None, help="its HF export (default: exported into --work-dir)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--runs", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--side", choices=["nemo_optim", "plain"], default=None, help=argparse.SUPPRESS)
    results_arguments(parser)
    args = parser.parse_args()
    if args.side:  # one side, in its own process
        result = run_nemo_optim(args) if args.side == "nemo_optim" else run_plain_loop(args)
        (Path(args.work_dir) / f"{args.side}.json").write_text(json.dumps(result))
        return
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="kd-vs-plain-")
    if args.student_hf is None:
        args.student_hf = str(Path(args.work_dir) / "student_hf")
        if not Path(args.student_hf).is_dir():
            # in a child: Linux keeps a process's peak RSS across fork + exec, so the parent stays small
            subprocess.run([sys.executable, "-c", "from nemo_optim.stages.convert import export_ckpt; "
                            f"export_ckpt(model_path={args.student!r}, output_path={args.student_hf!r}, "
                            "dtype='float32')"],
                           check=True)
    runs = {"nemo_optim": [], "plain": []}
    for _ in range(args.runs):
        for side in runs:
            runs[side].append(_side(args, side))
    tokens = args.micro_batch * args.micro_batches * args.seq_length
    rows = []
    for side, label in (("nemo_optim", "nemo-optim `distill` (megatron-core + ModelOpt)"),
                        ("plain", "plain PyTorch loop on transformers models")):
        first = runs[side][0]
        steady = [statistics.median(run["step_seconds"][1:]) for run in runs[side]]  # the first step warms up
        rows.append({"row": label, "seconds_per_step": statistics.median(steady), "run_seconds_per_step": steady,
                     "tokens_per_second": tokens / statistics.median(steady),
                     "peak_rss_gib": max(run["peak_rss_gib"] for run in runs[side]), "first_loss": first["losses"][0],
                     "last_loss": first["losses"][-1], "losses": first["losses"],
                     "same_losses_every_run": all(run["losses"] == first["losses"] for run in runs[side])})
    pair_ratios = [plain / nemo
                   for nemo, plain in zip(rows[0]["run_seconds_per_step"], rows[1]["run_seconds_per_step"])]
    ratio = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
    rows[0]["speed_vs_plain"], rows[1]["speed_vs_plain"] = ratio, 1.0
    rows[0]["speed_vs_plain_per_run"] = pair_ratios
    notes = (f"{args.steps} optimizer steps of {args.micro_batches} x {args.micro_batch} x {args.seq_length} = "
             f"{tokens} tokens, fp32 on CPU ({torch.get_num_threads()} threads), {args.runs} alternating runs per "
             f"side; tokens/s from "
             f"the median over runs of each run's median step after the first; nemo-optim / plain per run pair: "
             f"{', '.join(f'{r:.2f}' for r in pair_ratios)}. "
             f"Goal: nemo-optim >= 0.9x the plain loop's tokens/s, the same loss curve within noise. Step 1's loss "
             f"is computed before any update on the same batch, so both sides must agree there. "
             + __doc__.split("\n\n")[1].replace("\n", " ") + " " + args.note).strip()
    write_results("kd_vs_plain_loop", rows, [
        ("row", "implementation"), ("seconds_per_step", "s/step"), ("tokens_per_second", "tokens/s"),
        ("speed_vs_plain", "vs plain"), ("peak_rss_gib", "peak RSS (GiB)"), ("first_loss", "loss step 1"),
        ("last_loss", f"loss step {args.steps}"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
