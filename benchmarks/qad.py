"""Quantization-aware distillation (QAD) on SmolLM2-135M-Instruct (fp32, CPU): how much of the
PTQ loss a short KD run from the unquantized model wins back.

QAD is training, not PTQ. Each format is first quantized by the `ptq` stage with nemo-optim's
recipe, on the calibration rows of benchmarks/ptq.py (pydoc text); the `distill` stage then
trains that checkpoint's weights through ModelOpt's fake quantizers (calibrated scales kept)
with logit KD from the unquantized model, on pydoc text only: QAD never sees the held-out
domain. Evaluation as in benchmarks/ptq.py: 32 x 256 tokens of standard-library docstrings.

    .venv/bin/python -m benchmarks.qad               # all rows
    .venv/bin/python -m benchmarks.qad --rows "int4 block 32 + QAD @ lr 0.0002" --steps 2 --eval-sequences 4  # smoke
Writes benchmarks/results/qad.json and qad.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import check_rows, previous_results, results_arguments, reference_on_held_out, write_results
from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.distillation.config import load_distillation_config
from nemo_optim.stages.distill import distill
from nemo_optim.evaluation import evaluate_model
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.stages.ptq import ptq
from nemo_optim.training import TrainingConfig

MODEL = SMOLLM2
# format -> (QuantizationConfig overrides, export format); the PTQ rows of benchmarks/ptq.py
FORMATS = {
    "int4 block 32": ({"algorithm": "int4", "awq_block_size": 32}, "trtllm"),
    "fp8_pc_pt": ({"algorithm": "fp8_pc_pt"}, "trtllm"),  # ModelOpt 0.43's HF exporter fails on it
}
DEFAULT_STEPS = 60
# format -> (lr, steps) of its QAD rows
QAD_RUNS = {"int4 block 32": [(2e-4, 60), (5e-4, 60), (1e-3, 60)],
            "fp8_pc_pt": [(2e-5, 60), (5e-5, 60), (2e-4, 60), (1e-4, 150)]}
# row name -> (format, lr, steps)
ROWS = {f"{fmt} + QAD @ lr {lr:g}" + ("" if steps == DEFAULT_STEPS else f", {steps} steps"): (fmt, lr, steps)
        for fmt, runs in QAD_RUNS.items() for lr, steps in runs}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _quantized(fmt: str, work: Path, args) -> tuple[Path, float | None]:
    """The format's PTQ native checkpoint (made once per work dir) and its PTQ seconds."""
    native = work / f"{_slug(fmt)}_ptq_native"
    if (native / "manifest.json").is_file():
        return native, None
    overrides, export_format = FORMATS[fmt]
    began = time.perf_counter()
    ptq(model_path=MODEL, output_path=str(native), overwrite=True,
        export_config=ExportConfig(path=str(work / f"{_slug(fmt)}_ptq_export"), export_format=export_format),
        quantization_config=QuantizationConfig(calibration_dataset_size=args.calib_sequences,
                                               calibration_seq_len=args.seq_length, **overrides))
    return native, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results_arguments(parser, list(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="every row's QAD steps (default: the row's own)")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--calib-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=None, help="PTQ checkpoints made here are reused")
    args = parser.parse_args()
    check_rows(parser, args.rows, list(ROWS))
    previous_rows = {}
    if set(args.rows) != set(ROWS):
        previous_rows = {row["row"]: row for row in previous_results("qad", args.out).get("rows", [])}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="qad-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source="embedded:pydoc", seq_length=args.seq_length)

    formats = list(dict.fromkeys(ROWS[row][0] for row in args.rows))
    ptq_seconds, natives, qad = {}, {}, {}
    for fmt in formats:
        natives[fmt], ptq_seconds[fmt] = _quantized(fmt, work, args)
    for row in args.rows:
        fmt, lr, steps = ROWS[row]
        steps = args.steps or steps
        training = TrainingConfig(max_steps=steps, global_batch_size=args.global_batch,
                                  micro_batch_size=args.micro_batch, lr=lr, min_lr=lr / 10,
                                  warmup_steps=max(steps // 10, 1), val_check_interval=0, checkpoint_interval=0,
                                  num_val_sequences=8, log_interval=10)
        began = time.perf_counter()
        result = distill(model_path=str(natives[fmt]), teacher_model_path=MODEL,
                         output_path=str(work / _slug(row)),
                         distillation_config=load_distillation_config({}), data=data, training=training,
                         resume=False, overwrite=True)
        qad[row] = {"seconds_per_step": result.seconds_per_step, "qad_seconds": time.perf_counter() - began,
                    "qad_tokens": steps * args.global_batch * args.seq_length}

    rows = []
    with runtime.parallel_runtime():
        base, tokenizer, held_out, reference = reference_on_held_out(MODEL, args.seq_length, args.eval_sequences)
        rows.append({"row": "Q4_1 GGUF as fp32 (reference)", "perplexity": reference.perplexity,
                     "ppl_change_percent": 0.0})
        for fmt in FORMATS:
            native = natives.get(fmt)  # None: no row of this format ran now
            candidates = [(f"{fmt} (PTQ)", native, native is not None)]
            candidates += [(r, work / _slug(r), r in args.rows)
                           for r, (row_fmt, _, _) in ROWS.items() if row_fmt == fmt]
            for name, path, ran_now in candidates:
                if not ran_now:
                    if name in previous_rows:
                        rows.append(dict(previous_rows[name], reused=True))
                    continue
                result = evaluate_model(load_model(path).model, held_out, reference=base.model)
                summary = checkpoint.read_checkpoint_info(native).manifest["producer"]["summary"]
                rows.append({
                    "row": name, "perplexity": result.perplexity,
                    "ppl_change_percent": 100 * (result.perplexity / reference.perplexity - 1),
                    "kl": result.kl_to_reference, "top1_agreement": result.top1_agreement,
                    "effective_bits": summary["effective_bits"], "quantized_share": summary["quantized_linear_share"],
                    "ptq_seconds": ptq_seconds[fmt] if path == native else None,
                    "qad_tokens": 0, **qad.get(name, {}),
                    "measured": datetime.date.today().isoformat(),
                })
                print(rows[-1], flush=True)
    notes = (f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32: its decoder weights already carry 4-bit "
             f"rounding) on CPU ({torch.get_num_threads()} threads). PTQ: nemo-optim's recipe for the "
             f"format (max + GPTQ-lite), {args.calib_sequences} x {args.seq_length} calibration tokens of pydoc text, "
             f"as in ptq.md. QAD: the `distill` stage with the PTQ checkpoint as student (fake quantizers and "
             f"calibrated scales kept, weights trained through them) and the unquantized model as teacher, logit KL "
             f"only, steps x {args.global_batch} x {args.seq_length} tokens of pydoc text (column 'QAD tokens'; "
             f"{DEFAULT_STEPS} steps unless the row says otherwise; train split, never the held-out domain; more "
             f"than its ~97k tokens repeat it), AdamW at the row's lr, warmup (a tenth of the steps) + cosine to "
             f"lr/10. Held out: {args.eval_sequences} x {args.seq_length} tokens of standard-library docstrings "
             f"(ptq.md's). PTQ seconds "
             f"include the export; '-' where the PTQ checkpoint was reused from the work dir. "
             + (f"Rows kept from an earlier run of this script: "
                f"{', '.join(r['row'] for r in rows if r.get('reused'))}. "
                if any(r.get("reused") for r in rows) else "") + args.note).strip()
    write_results("qad", rows, [
        ("row", "config"), ("perplexity", "ppl"), ("ppl_change_percent", "ppl change %"), ("kl", "KL"),
        ("top1_agreement", "top-1"), ("effective_bits", "bits/weight"), ("quantized_share", "quantized share"),
        ("qad_tokens", "QAD tokens"), ("seconds_per_step", "QAD s/step"), ("qad_seconds", "QAD s"),
        ("ptq_seconds", "PTQ s"), ("measured", "measured"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
