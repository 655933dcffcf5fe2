"""Task accuracy of SmolLM2-135M-Instruct and its compressed forms on the embedded multiple-choice
task (`embedded:stdlib-cloze`: pick the true next sentence of held-out Python documentation among
4; chance 25%), with 95% intervals and a paired count against the original.

The reference is the Q4_1 GGUF of SmolLM2 dequantized to fp32 (its decoder linears already carry
4-bit rounding). Rows:
  - PTQ FP8 / INT8-SmoothQuant / INT4-AWQ: nemo-optim's SmolLM2 CPU recipes with 16 calibration
    sequences (experiments/smollm2_ptq_formats.py's settings) and ModelOpt's preset calibration
    (max / SmoothQuant / AWQ-lite, what NeMo 2 ran; no GPTQ-lite or auto_quantize search, which would
    add much time per format: benchmarks/results/README.md, Run times), run here;
  - INT4 PTQ (block 32, GPTQ-lite) and INT4 PTQ + QAD: `python -m experiments.qad_smollm2`'s outputs;
  - teacher corrected, pruned (30 -> 18 layers), distilled, distilled + FP8: `make run`'s outputs
    (experiments/compress_smollm2.py).
A row whose experiment has not run is left out (the note says so); a row whose experiment wrote
an evaluation with this task and item count is read from it, not recomputed.

    .venv/bin/python -m benchmarks.accuracy                     # after the experiments
    .venv/bin/python -m benchmarks.accuracy --items 16 --rows original "PTQ FP8 (preset)"   # smoke
Writes benchmarks/results/accuracy.json and accuracy.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import json
import math
import tempfile
from pathlib import Path

import fiddle as fdl

from benchmarks.common import check_rows, results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.accuracy.multiple_choice import AccuracyConfig, evaluate_multiple_choice, task_items
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim_recipes.ptq import smollm2_135m_ptq_fp8_cpu, smollm2_135m_ptq_int4_awq_cpu, smollm2_135m_ptq_int8_sq_cpu

MODEL = SMOLLM2
TASK = "embedded:stdlib-cloze"
PTQ_RECIPES = {"PTQ FP8 (preset)": smollm2_135m_ptq_fp8_cpu, "PTQ INT8-SQ (preset)": smollm2_135m_ptq_int8_sq_cpu,
               "PTQ INT4-AWQ (preset)": smollm2_135m_ptq_int4_awq_cpu}
# row -> (experiment work dir argument, model path inside it, its evaluation JSON inside it)
EXPERIMENT_ROWS = {
    "INT4 PTQ (block 32)": ("qad_dir", "ptq_int4_native", "evaluations/evaluate_int4_ptq.json"),
    "INT4 PTQ + QAD": ("qad_dir", "qad_int4", "evaluations/evaluate_int4_ptq_qad.json"),
    "teacher corrected": ("compress_dir", "teacher_corrected", "evaluations/evaluate_teacher_corrected.json"),
    "pruned 18 layers": ("compress_dir", "pruned", "evaluations/evaluate_pruned.json"),
    "distilled": ("compress_dir", "distilled", "evaluations/evaluate_distilled.json"),
    "distilled + FP8": ("compress_dir", "quantized_fp8_hf_native", "evaluations/evaluate_distilled_fp8.json"),
}
ROWS = ["original", *PTQ_RECIPES, *EXPERIMENT_ROWS]


def _quantize(row: str, work: Path) -> Path:
    """Runs the row's PTQ recipe into `work`; returns its native checkpoint (reused if there)."""
    recipe = PTQ_RECIPES[row]()
    export = work / re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")
    recipe.model_path, recipe.export_config.path = MODEL, str(export)
    recipe.quantization_config.calibration_dataset_size = 16
    recipe.quantization_config.calibration_algorithm = "preset"
    recipe.quantization_config.auto_quantize_bits = None
    native = Path(f"{export}_native")  # ptq saves the calibrated model beside its export
    if not native.is_dir():
        fdl.build(recipe)()
    return native


def _stored_accuracy(evaluation: Path, items: int | None) -> dict | None:
    if not evaluation.is_file():
        return None
    accuracy = json.loads(evaluation.read_text()).get("task_accuracy") or {}
    if accuracy.get("task") == TASK and "predictions" in accuracy and (items is None or accuracy["items"] == items):
        return accuracy
    return None


def _paired(reference: dict, result: dict) -> dict:
    """Items the reference got right and this model wrong, and the reverse (acc_norm picks),
    with the sign test's two-sided p-value for 'no difference'."""
    answers_ref = reference["predictions_norm"]
    truth = reference["answers"]
    lost = sum(r == t != p for r, p, t in zip(answers_ref, result["predictions_norm"], truth))
    won = sum(p == t != r for r, p, t in zip(answers_ref, result["predictions_norm"], truth))
    n = lost + won
    p_value = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(lost, won) + 1)) / 2**n) if n else 1.0
    return {"lost": lost, "won": won, "sign_test_p": p_value,
            "same_pick": sum(a == b for a, b in zip(answers_ref, result["predictions_norm"])) / len(truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results_arguments(parser, ROWS)
    parser.add_argument("--items", type=int, default=None, help="score the first N items (default: all)")
    parser.add_argument("--compress-dir", type=Path, default=Path("outputs/compress_smollm2"))
    parser.add_argument("--qad-dir", type=Path, default=Path("outputs/qad_smollm2"))
    parser.add_argument("--work-dir", type=Path, default=None, help="PTQ checkpoints (default: a new temp dir)")
    args = parser.parse_args()
    check_rows(parser, args.rows, ROWS)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="accuracy-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    config = AccuracyConfig(task=TASK, num_items=args.items)

    paths, stored, missing = {"original": MODEL}, {}, []
    for row in args.rows:
        if row in PTQ_RECIPES:
            paths[row] = _quantize(row, work)
        elif row in EXPERIMENT_ROWS:
            directory, model, evaluation = EXPERIMENT_ROWS[row]
            root = getattr(args, directory)
            if not (root / model).is_dir():
                missing.append(row)
                continue
            paths[row] = root / model
            stored[row] = _stored_accuracy(root / evaluation, args.items)

    results = {}
    with runtime.parallel_runtime():
        for row, path in paths.items():
            if row not in args.rows and row != "original":
                continue
            if stored.get(row):
                results[row] = dict(stored[row], reused=True)
                continue
            loaded = load_model(path)
            result = evaluate_multiple_choice(loaded.model, load_tokenizer(loaded.hf_dir), config,
                                              max_length=loaded.config.max_position_embeddings)
            results[row] = result.to_dict()
            print(row, result.accuracy, result.accuracy_norm, flush=True)

    answers = [item.answer for item in task_items(config)[0]]
    reference = dict(results["original"], answers=answers)
    rows = []
    for row, result in results.items():
        rows.append({
            "row": row, "path": str(paths[row]), "items": result["items"],
            "accuracy": result["accuracy"], "ci95": "{:.2f}-{:.2f}".format(*result["ci95"]),
            "accuracy_norm": result["accuracy_norm"], "ci95_norm": "{:.2f}-{:.2f}".format(*result["ci95_norm"]),
            "change_norm_points": 100 * (result["accuracy_norm"] - reference["accuracy_norm"]),
            **({} if row == "original" else _paired(reference, result)),
            "from_experiment": bool(result.get("reused")), "measured": datetime.date.today().isoformat(),
        })
    notes = (
        f"Task `{TASK}`: {len(answers)} items, 4 choices (chance 25%), zero-shot; the true next sentence of a held-out "
        "Python documentation passage among 3 length-matched sentences of other passages (validation split, texts "
        "that recur in train/calibration text removed). acc: highest summed log-likelihood; acc_norm: highest per "
        "character (lm-eval's). 95% Wilson intervals: with ~120 items they span about +-9 points, so only large "
        "changes are real; 'lost' / 'won': items the original (acc_norm) got right and this model wrong, and the "
        "reverse; sign-test p for 'no change'. The original is the Q4_1 GGUF of SmolLM2-135M-Instruct dequantized to "
        "fp32: every row inherits its 4-bit rounding. Rows marked from_experiment were read from the experiment's "
        "evaluate stage (same code, same items). "
        + (f"Not run (their experiment's outputs are missing): {', '.join(missing)}. " if missing else "")
        + args.note
    ).strip()
    write_results("accuracy", rows, [
        ("row", "model"), ("accuracy", "acc"), ("ci95", "acc 95% CI"), ("accuracy_norm", "acc_norm"),
        ("ci95_norm", "acc_norm 95% CI"), ("change_norm_points", "acc_norm change (points)"), ("lost", "lost"),
        ("won", "won"), ("sign_test_p", "sign-test p"), ("same_pick", "same pick as original"),
        ("measured", "measured"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
