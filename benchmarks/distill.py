"""Distillation at CPU scale: SmolLM2-135M teacher, a Minitron depth-pruned student (<= 70% of
the parameters), equal token budgets.

Rows: no training; plain cross-entropy fine-tuning; KD on logits; KD on logits + a cosine loss
on the final norm's output; KD on logits + the LM loss (ModelOpt's balancer); and KD rows from a
*corrected* teacher (Minitron's teacher correction: the teacher fine-tuned on the same train
split first, `nemo_optim.stages.finetune`). Each: held-out perplexity, KL / top-1 agreement to the
original teacher, seconds per step. Also the step-time ratio KD / (student fwd+bwd + teacher fwd).
CE and the best KD recipe are also run at other lrs (rows "<row> @ lr X"); 'ppl / CE' divides by
CE at its best lr. Both are repeated at their best lr with other seeds (rows "... , seed S": other
samples of the train split) and the notes give KD / CE per seed and of the means.

    .venv/bin/python -m benchmarks.distill            # every row
    .venv/bin/python -m benchmarks.distill --core     # no training, CE, KD logits (+ intermediate), best KD
    .venv/bin/python -m benchmarks.distill --rows "KD logits + LM loss"   # one row; others kept
    .venv/bin/python -m benchmarks.distill --rows "cross-entropy fine-tuning @ lr 0.001" --work-dir W \
--reuse-checkpoints
Writes benchmarks/results/distill.json and distill.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import check_rows, previous_results, results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.distillation.config import load_distillation_config
from nemo_optim.stages.distill import distill
from nemo_optim.evaluation import evaluate_model
from nemo_optim.stages.finetune import finetune
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.pruning.config import PruningConfig
from nemo_optim.stages.prune import prune
from nemo_optim.training import TrainingConfig

TEACHER = SMOLLM2


def _evaluate(model_path, teacher, held_out) -> dict:
    model = load_model(model_path).model
    result = evaluate_model(model, held_out, reference=teacher)
    return {"perplexity": result.perplexity, "kl_to_teacher": result.kl_to_reference,
            "top1_agreement": result.top1_agreement}


def _fine_tune(student_path, output: Path, data: DataConfig, training: TrainingConfig) -> float:
    """Plain next-token cross-entropy on the same text and budget; returns seconds per step."""
    result = finetune(model_path=str(student_path), output_path=str(output), data=data, training=training,
                      resume=False, overwrite=True)
    return result.seconds_per_step


@torch.no_grad()
def _teacher_forward_seconds(teacher, tokens, micro_batch_size, repeats=3) -> float:
    began = time.perf_counter()
    for _ in range(repeats):
        for batch in tokens.split(micro_batch_size):
            forward_logits(teacher, batch)
    return (time.perf_counter() - began) / repeats


CE = "cross-entropy fine-tuning"
CORRECTED = "corrected teacher"
TRAINED_ROWS = (CE, "KD logits", "KD logits + final-norm cosine", "KD logits + LM loss",
                "KD logits, corrected teacher", "KD logits + LM loss, corrected teacher")
# A small lr sweep for the baseline and for the best KD recipe, so that each is compared at
# its best lr (the others run at --lr): row "<name> @ lr <lr>"
LR_SWEEP = {CE: (2.5e-4, 7e-4, 1e-3), "KD logits + LM loss, corrected teacher": (1e-3, 1.4e-3, 2e-3)}
# the KD share of the loss raised (ModelOpt's kd_loss_scale: LM loss + 3 x KD scaled to the LM loss)
# and the KD temperature raised (logit_kl_temperature; the balancer rescales the KD loss to the
# LM loss, so no T^2 factor is needed)
EXTRA_ROWS = ("KD logits + LM loss (KD x3), corrected teacher @ lr 0.001",
              "KD logits + LM loss (T 2), corrected teacher @ lr 0.001")
# One 60-step run is noisy (neighbouring lrs differ by up to 1 ppl), so CE and the best KD recipe
# are repeated with other seeds (another sample of the train split; for KD the teacher is
# corrected again on that seed's tokens): rows "<name> @ lr X, seed S"
BEST_LRS = {CE: 5e-4, "KD logits + LM loss (T 2), corrected teacher": 1e-3}
DEFAULT_SEED = TrainingConfig.seed
REPEAT_SEEDS = (1, 2, 3)
SEED_ROWS = tuple(f"{name} @ lr {lr:g}, seed {seed}" for name, lr in BEST_LRS.items() for seed in REPEAT_SEEDS)
# the comparison at equal tokens: CE, KD on logits, KD on logits + an intermediate
# layer, and the best KD recipe
CORE_ROWS = (CE, "KD logits", "KD logits + final-norm cosine",
             "KD logits + LM loss (T 2), corrected teacher @ lr 0.001")
ALL_ROWS = (TRAINED_ROWS + tuple(f"{name} @ lr {lr:g}" for name, lrs in LR_SWEEP.items() for lr in lrs) + EXTRA_ROWS
            + SEED_ROWS)


def _split_row(row: str, default_lr: float) -> tuple[str, float, int]:
    """(method, lr, seed) of a row name "<method>[ @ lr X[, seed S]]"."""
    name, _, rest = row.partition(" @ lr ")
    lr, _, seed = rest.partition(", seed ")
    return name, float(lr) if lr else default_lr, int(seed) if seed else DEFAULT_SEED


def _kd_fields(name: str, temperature: float) -> dict:
    fields = {"logit_kl_temperature": temperature}
    if "final-norm cosine" in name:
        fields["intermediate_layer_pairs"] = [["decoder.final_layernorm", "decoder.final_layernorm"]]
    if "(T " in name:
        fields["logit_kl_temperature"] = float(name.split("(T ")[1].split(")")[0])
    if "(KD x" in name:
        fields["kd_loss_scale"] = float(name.split("(KD x")[1].split(")")[0])
    if "+ LM loss" in name:
        # ModelOpt's balancer: LM loss + KD loss rescaled to the LM loss's magnitude
        fields["skip_lm_loss"] = False
    return fields


def _logged_seconds_per_step(run_dir: Path) -> float:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["seconds_per_step"] for row in steps if row["kind"] == "train"]
    return sum(times) / len(times)


def _trained_with(output: Path, training: TrainingConfig, corrected_teacher: bool) -> bool:
    """Whether `output` is a complete student trained with these settings (and teacher)."""
    from nemo_optim import checkpoint

    if not checkpoint.is_checkpoint(output):
        return False
    producer = checkpoint.read_checkpoint_info(output).manifest.get("producer", {})
    same_teacher = producer.get("stage") != "distill" or (producer.get("teacher") != TEACHER) == corrected_teacher
    return producer.get("training") == json.loads(json.dumps(dataclasses.asdict(training))) and same_teacher


def _slug(row: str) -> str:
    return (row.replace(" @ lr ", "_lr").replace(", seed ", "_seed").replace(" ", "_").replace(",", "")
            .replace("(", "").replace(")", ""))


def _seed_summary(rows: list[dict], label, default_lr: float) -> dict:
    """Perplexity of CE and of the best KD recipe (each at its best lr) over every seed, and
    KD / CE per seed (same tokens) and of the means."""
    by_name = {row["model"]: row["perplexity"] for row in rows}
    summary = {}
    for name, lr in BEST_LRS.items():
        base = label(name if lr == default_lr else f"{name} @ lr {lr:g}")
        per_seed = {DEFAULT_SEED: by_name.get(base)}
        per_seed.update({seed: by_name.get(label(f"{name} @ lr {lr:g}, seed {seed}")) for seed in REPEAT_SEEDS})
        summary[name] = {"lr": lr, "perplexity_by_seed": per_seed}
    ce, kd = (summary[name]["perplexity_by_seed"] for name in BEST_LRS)
    seeds = [seed for seed in ce if ce[seed] is not None and kd[seed] is not None]
    if seeds:
        summary["seeds"] = seeds
        summary["kd_over_ce_by_seed"] = {seed: kd[seed] / ce[seed] for seed in seeds}
        summary["kd_over_ce_of_means"] = statistics.fmean(kd[s] for s in seeds) / statistics.fmean(ce[s] for s in seeds)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-layers", type=int, default=18)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--teacher-correction-lr", type=float, default=1e-4)
    parser.add_argument("--eval-sequences", type=int, default=32)
    results_arguments(parser, list(ALL_ROWS))
    parser.add_argument("--core", action="store_true",
                        help=f"run only {list(CORE_ROWS)} (~35 min on 2 cores)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--reuse-checkpoints", action="store_true",
                        help="rows whose trained student is already complete in --work-dir are evaluated, "
                             "not retrained")
    args = parser.parse_args()
    if args.core:
        args.rows = list(CORE_ROWS)
    check_rows(parser, args.rows, list(ALL_ROWS))
    previous_rows = {}
    if set(args.rows) != set(ALL_ROWS):
        previous_rows = {row["model"]: row for row in previous_results("distill", args.out).get("rows", [])}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source="embedded", seq_length=args.seq_length)
    training = TrainingConfig(max_steps=args.steps, global_batch_size=args.global_batch,
                              micro_batch_size=args.micro_batch,
                              lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(args.steps // 10, 1),
                              val_check_interval=0, checkpoint_interval=0, num_val_sequences=8, log_interval=10)
    tokens_per_row = args.steps * args.global_batch * args.seq_length

    student = work / f"pruned_depth{args.student_layers}"
    began = time.perf_counter()
    if not (student / "manifest.json").is_file():
        prune(model_path=TEACHER, output_path=str(student), overwrite=True, num_train_samples=64, data=data,
              pruning_config=PruningConfig(target_num_layers=args.student_layers), scores_path=str(work / "scores"))
    prune_seconds = time.perf_counter() - began

    # Teacher correction: the teacher's own LM-loss fine-tuning on the same train split and
    # token budget, at a lower lr (it is a trained model); done once, reused by every such row
    correction_seconds = None

    def corrected_teacher(seed: int) -> Path:
        nonlocal correction_seconds
        path = work / ("teacher_corrected" if seed == DEFAULT_SEED else f"teacher_corrected_seed{seed}")
        if not (path / "manifest.json").is_file():
            correction = dataclasses.replace(training, lr=args.teacher_correction_lr,
                                             min_lr=args.teacher_correction_lr / 10, seed=seed)
            began = time.perf_counter()
            finetune(model_path=TEACHER, output_path=str(path), data=data, training=correction,
                     resume=False, overwrite=True)
            if seed == DEFAULT_SEED:
                correction_seconds = time.perf_counter() - began
        return path

    corrected_teacher(DEFAULT_SEED)
    seconds = {"no training": None}
    for row in args.rows:
        name, lr, seed = _split_row(row, args.lr)
        row_training = dataclasses.replace(training, lr=lr, min_lr=lr / 10, seed=seed)
        output = work / _slug(row)
        if args.reuse_checkpoints and _trained_with(output, row_training, CORRECTED in name):
            seconds[row] = _logged_seconds_per_step(output.parent / f"{output.name}_run")
            continue
        if name == CE:
            seconds[row] = _fine_tune(student, output, data, row_training)
            continue
        teacher_path = str(corrected_teacher(seed)) if CORRECTED in name else TEACHER
        result = distill(model_path=str(student), teacher_model_path=teacher_path, output_path=str(output),
                         distillation_config=load_distillation_config(_kd_fields(name, args.temperature)), data=data,
                         training=row_training, resume=False, overwrite=True)
        seconds[row] = result.seconds_per_step

    def label(name):
        return f"student {args.student_layers} layers: {name}"

    rows = []
    with runtime.parallel_runtime():
        teacher_loaded = load_model(TEACHER)
        teacher = teacher_loaded.model
        tokenizer = load_tokenizer(teacher_loaded.hf_dir)
        held_out = packed_sequences(data, "validation", tokenizer, args.eval_sequences)
        teacher_result = evaluate_model(teacher, held_out)
        teacher_step = _teacher_forward_seconds(teacher, packed_sequences(data, "train", tokenizer, args.global_batch),
                                                args.micro_batch)
        rows.append({"model": "teacher (SmolLM2-135M)", "parameters_m": teacher_loaded.config.num_parameters() / 1e6,
                     "tokens": 0, "perplexity": teacher_result.perplexity, "kl_to_teacher": 0.0, "top1_agreement": 1.0})
        rows.append({"model": "teacher corrected (fine-tuned on the train split)",
                     "parameters_m": rows[0]["parameters_m"],
                     "tokens": tokens_per_row, **_evaluate(corrected_teacher(DEFAULT_SEED), teacher, held_out),
                     "seconds_per_step": None})
        student_params = load_model(student).config.num_parameters()
        for name in ("no training", *ALL_ROWS):
            if name != "no training" and name not in args.rows:
                if label(name) in previous_rows:
                    rows.append(dict(previous_rows[label(name)], reused=True))
                continue
            path = student if name == "no training" else work / _slug(name)
            rows.append({"model": label(name), "parameters_m": student_params / 1e6,
                         "tokens": 0 if name == "no training" else tokens_per_row,
                         **_evaluate(path, teacher, held_out), "seconds_per_step": seconds[name]})
    by_name = {row["model"]: row for row in rows}
    # the baseline is CE at its best lr of the sweep (seed repeats are summarised apart)
    ce_ppl = min(row["perplexity"] for row in rows
                 if row["model"].startswith(label(CE)) and ", seed " not in row["model"])
    seeds = _seed_summary(rows, label, args.lr)
    for row in rows[1:]:
        row["ppl_vs_teacher"] = row["perplexity"] / teacher_result.perplexity
        row["ppl_vs_ce"] = row["perplexity"] / ce_ppl
    ce_step = by_name[label(CE)]["seconds_per_step"]
    kd_step = by_name[label("KD logits")]["seconds_per_step"]
    ratio = kd_step / (ce_step + teacher_step)
    reused = [row["model"] for row in rows if row.get("reused")]
    reused_timing = any(label(name) in reused for name in (CE, "KD logits"))
    notes = (f"Teacher {TEACHER} ({rows[0]['parameters_m']:.1f} M; the Q4_1 GGUF dequantized to fp32), student: "
             f"Minitron depth pruning to {args.student_layers} layers "
             f"({100 * student_params / teacher_loaded.config.num_parameters():.0f}% of the "
             f"parameters; pruning {prune_seconds:.0f} s incl. importance). Every trained row: {args.steps} steps x "
             f"{args.global_batch} x {args.seq_length} tokens = {tokens_per_row} tokens of the embedded corpus's "
             f"train split, AdamW lr {args.lr} (unless the row says another) warmup+cosine to lr/10, fp32 on CPU "
             f"({torch.get_num_threads()} threads). Held-out: "
             f"{args.eval_sequences} x {args.seq_length} tokens of the validation split. KD temperature "
             f"{args.temperature}. Teacher correction (rows '{CORRECTED}'): the teacher fine-tuned with the LM loss "
             f"on the same train split and "
             f"budget ({args.steps} steps, lr {args.teacher_correction_lr}"
             + (f", {correction_seconds:.0f} s" if correction_seconds else ", reused from the work dir")
             + "), once for all students; KL / top-1 columns are against the original teacher. 'ppl / CE' divides by "
             f"the best cross-entropy row (the lowest perplexity over its lrs: {ce_ppl:.2f}). "
             + (f"Step time: KD {kd_step:.2f} s, CE (student fwd+bwd) {ce_step:.2f} s, teacher forward "
                f"{teacher_step:.2f} s -> KD / (student fwd+bwd + teacher fwd) = {ratio:.3f}."
                if not reused_timing else
                "s/step of rows from different runs (and different load on the machine) are not comparable; "
                "the KD step-time ratio is measured in distill_step_time.md."))
    if "kd_over_ce_of_means" in seeds:
        ce_by_seed, kd_by_seed = (seeds[name]["perplexity_by_seed"] for name in BEST_LRS)
        notes += (f" Seeds {seeds['seeds']} (each a different sample of the train split; KD's teacher corrected on "
                  f"the same seed's tokens): CE ppl {[round(ce_by_seed[s], 2) for s in seeds['seeds']]}, KD ppl "
                  f"{[round(kd_by_seed[s], 2) for s in seeds['seeds']]}, KD / CE per seed "
                  f"{[round(r, 3) for r in seeds['kd_over_ce_by_seed'].values()]}, of the means "
                  f"{seeds['kd_over_ce_of_means']:.3f}.")
    if reused:
        notes += (f" Rows reused from the previous run with the same settings (the pruned student is deterministic): "
                  f"{', '.join(reused)}.")
    write_results("distill", rows, [
        ("model", "model"), ("parameters_m", "params (M)"), ("tokens", "train tokens"), ("perplexity", "ppl"),
        ("ppl_vs_teacher", "ppl / teacher"), ("ppl_vs_ce", "ppl / CE"), ("kl_to_teacher", "KL to teacher"),
        ("top1_agreement", "top-1 agree"), ("seconds_per_step", "s/step"),
    ], notes, args.out, extra={"seed_summary": seeds})
    print(dataclasses.asdict(training))


if __name__ == "__main__":
    main()
