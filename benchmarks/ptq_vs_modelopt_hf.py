"""PTQ: nemo-optim's `ptq` stage against ModelOpt's Hugging Face path (what ModelOpt's
examples/llm_ptq/hf_ptq.py does: the transformers model, `mtq.quantize` with a preset config and a
calibration forward loop, `export_hf_checkpoint`).

Both sides: SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32) on CPU, the same calibration
rows (nemo-optim's: 16 x 256 tokens of pydoc text, calibration split), ModelOpt's preset
calibration (max / SmoothQuant / AWQ-lite: what hf_ptq.py runs; nemo-optim's tuned GPTQ-lite default
is off here), INT4-AWQ at block 64 on both (SmolLM2's 576-wide layers do not take ModelOpt's 128).
Time: "load->export" from loading the tokenizer and the model to the end of the export (tokenizing the
calibration rows and writing the tokenizer into the export included on both sides, as hf_ptq.py does),
libraries imported before the clock starts on both sides; "command" the whole process (interpreter
start, imports, tokenizing the calibration rows, load, calibrate, export, exit), what a user waits for.
Each side runs in its own process (nemo-optim's started as its executors start CPU jobs, with glibc's
tcache off; ModelOpt's in the plain environment); the two sides alternate, 3 runs each, medians
reported; peak RSS is that process's. Quality is measured in other processes (ModelOpt's HF exporter
compresses weights in place, so that side quantizes the same way again). nemo-optim also saves its
native checkpoint (the exports are made from it if an export fails). FP8 is measured again with 128
calibration rows: what is fixed cost and what grows with the rows. Quality on held-out text of another
domain (16 x 256 tokens of standard-library docstrings), against each side's own fp32 model (megatron's
and transformers' fp32 logits agree: benchmarks/results/README.md): perplexity, KL, top-1 agreement;
nemo-optim's minus the HF path's with a 95% interval (paired bootstrap over the 16 sequences: an interval
that holds 0 is a difference within the noise of this held-out set).

    .venv/bin/python -m benchmarks.ptq_vs_modelopt_hf
    .venv/bin/python -m benchmarks.ptq_vs_modelopt_hf --formats fp8    # one format
Writes benchmarks/results/ptq_vs_modelopt_hf.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    merge_previous_rows,
    nemo_optim_process_env,
    previous_results,
    results_arguments,
    write_results,
)
from nemo_optim.models.hf import SMOLLM2

FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG"}
AWQ_BLOCK = 64
CALIBRATION_SEQUENCES, EVAL_SEQUENCES, SEQ_LENGTH = 16, 16, 256
LONG_CALIBRATION = "fp8@128"  # one format again with 8x the calibration rows: fixed costs vs per-row costs


def _parse(point: str) -> tuple[str, int]:
    fmt, _, sequences = point.partition("@")
    return fmt, int(sequences or CALIBRATION_SEQUENCES)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _quantization_config(fmt: str, sequences: int = CALIBRATION_SEQUENCES):
    from nemo_optim.quantization.config import QuantizationConfig

    return QuantizationConfig(algorithm=fmt, calibration_algorithm="preset", awq_block_size=AWQ_BLOCK,
                              calibration_dataset_size=sequences, calibration_seq_len=SEQ_LENGTH)


def _held_out(tokenizer) -> torch.Tensor:
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.data.packing import packed_sequences

    return packed_sequences(DataConfig(source="embedded:docstrings", seq_length=SEQ_LENGTH), "train", tokenizer,
                            EVAL_SEQUENCES)


def _metrics(pairs) -> dict:
    """(model logits, reference logits, labels) per batch -> perplexity, KL, top-1 agreement, and the
    sums behind them per held-out sequence (for the paired comparison of the two sides)."""
    per_sequence = {"nll": [], "kl": [], "agree": [], "tokens": []}
    for logits, reference, labels in pairs:
        log_probs, ref_log_probs = F.log_softmax(logits.float(), -1), F.log_softmax(reference.float(), -1)
        per_sequence["nll"] += F.nll_loss(log_probs.transpose(1, 2), labels, reduction="none").sum(-1).tolist()
        per_sequence["kl"] += F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="none").sum((1, 2)).tolist()
        per_sequence["agree"] += (logits.argmax(-1) == reference.argmax(-1)).sum(-1).tolist()
        per_sequence["tokens"] += [labels.shape[1]] * labels.shape[0]
    return _totals(per_sequence) | {"per_sequence": per_sequence}


def _totals(per_sequence: dict, rows: list[int] | None = None) -> dict:
    rows = range(len(per_sequence["tokens"])) if rows is None else rows
    count = sum(per_sequence["tokens"][i] for i in rows)

    def total(key):
        return sum(per_sequence[key][i] for i in rows)

    return {"perplexity": math.exp(total("nll") / count), "kl": total("kl") / count,
            "top1_agreement": total("agree") / count}


def paired_interval(ours: dict, theirs: dict, metric: str, resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of (ours - theirs) for `metric`, resampling the held-out sequences in
    pairs (both sides saw the same sequences): an interval that holds 0 is a difference within noise."""
    generator = random.Random(0)
    count = len(ours["tokens"])
    differences = sorted(
        _totals(ours, rows)[metric] - _totals(theirs, rows)[metric]
        for rows in ([generator.randrange(count) for _ in range(count)] for _ in range(resamples)))
    return differences[int(0.025 * resamples)], differences[int(0.975 * resamples) - 1]


def run_nemo_optim(point: str, work: Path) -> dict:
    import megatron.core  # noqa: F401 - imported before the clock starts, as the HF side's imports
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401
    import transformers  # noqa: F401

    from nemo_optim.quantization.config import ExportConfig
    from nemo_optim.stages.ptq import ptq

    fmt, sequences = _parse(point)
    export_format = "hf" if fmt == "fp8" else "trtllm"  # the megatron HF exporter has no INT8 / INT4-AWQ
    began = time.perf_counter()
    ptq(model_path=SMOLLM2, quantization_config=_quantization_config(fmt, sequences), overwrite=True,
        model_dtype="float32",
        export_config=ExportConfig(path=str(work / f"nemo_{point}"), export_format=export_format, dtype="fp16"))
    return {"wall_seconds": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(), "export": export_format}


def evaluate_nemo_optim(point: str, work: Path) -> dict:
    from nemo_optim import runtime
    from nemo_optim.models.forward import forward_logits
    from nemo_optim.models.loader import load_model, load_tokenizer

    with runtime.parallel_runtime():
        quantized, reference = load_model(work / f"nemo_{point}_native").model, load_model(SMOLLM2)
        rows = _held_out(load_tokenizer(reference.hf_dir))
        pairs = ((forward_logits(quantized, batch), forward_logits(reference.model, batch), batch[:, 1:])
                 for batch in rows.split(4))
        return _metrics(pairs)


def run_modelopt_hf(point: str, work: Path, evaluate: bool = False) -> dict:
    """Quantize + export (timed), or, with `evaluate`, quantize again and measure quality: the HF
    exporter compresses the weights in place, so the exported model cannot be evaluated. The
    evaluated model first gets what the exporter does to it before writing: layers that share an
    input (q/k/v, gate/up) re-smoothed and re-quantized to one input scale."""
    import copy

    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    from nemo_optim.models.hf import gguf_to_hf
    from nemo_optim.models.loader import load_tokenizer, resolve_source
    from nemo_optim.quantization.quantizer import calibration_batches

    hf_dir = gguf_to_hf(resolve_source(SMOLLM2).path)
    fmt, sequences = _parse(point)
    began = time.perf_counter()
    # as hf_ptq.py (and nemo-optim's stage) inside the clock: the tokenizer, the model, the calibration rows
    tokenizer = load_tokenizer(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batches = calibration_batches(_quantization_config(fmt, sequences), tokenizer)
    config = copy.deepcopy(getattr(mtq, FORMATS[fmt]))
    if fmt == "int4_awq":
        config["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] = AWQ_BLOCK

    def forward_loop(m):
        with torch.no_grad():
            for batch in batches:
                m(batch[:, :-1])

    mtq.quantize(model, config, forward_loop)
    if evaluate:
        from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

        requantize_resmooth_fused_llm_layers(model)
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            pairs = ((model(batch[:, :-1]).logits, reference(batch[:, :-1]).logits, batch[:, 1:])
                     for batch in _held_out(tokenizer).split(4))
            return _metrics(pairs)
    export = "hf"
    try:
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=str(work / f"modelopt_{point}"))
        tokenizer.save_pretrained(str(work / f"modelopt_{point}"))  # hf_ptq.py's export writes it too
    except Exception as error:  # noqa: BLE001 - report what ModelOpt's exporter says, keep measuring
        export = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return {"wall_seconds": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(), "export": export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS),
                        help="formats to measure (default: all); the other rows are kept from the previous results "
                             "file")
    parser.add_argument("--long-calibration", default=LONG_CALIBRATION,
                        help="FORMAT@ROWS measured again with more calibration rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (the median is reported)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    results_arguments(parser)
    args = parser.parse_args()
    if args.side:  # one (side, point), in its own process
        side, point = args.side.split(":")
        work = Path(args.work_dir)
        if side == "nemo_optim":
            result = run_nemo_optim(point, work)
        elif side == "nemo_optim_eval":
            result = evaluate_nemo_optim(point, work)
        else:
            result = run_modelopt_hf(point, work, evaluate=side == "modelopt_hf_eval")
        Path(args.result).write_text(json.dumps(result))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ptq-vs-hf-"))
    work.mkdir(parents=True, exist_ok=True)

    def measured(side: str, point: str, run: int = 0) -> dict:
        result_file = work / f"{side}_{point}_{run}.json"
        if not result_file.is_file():
            began = time.perf_counter()
            subprocess.run([sys.executable, "-m", "benchmarks.ptq_vs_modelopt_hf", "--side", f"{side}:{point}",
                            "--work-dir", str(work), "--result", str(result_file)], check=True,
                           env=nemo_optim_process_env() if side.startswith("nemo_optim") else None)
            process_seconds = time.perf_counter() - began  # interpreter start, imports, work, exit
            result_file.write_text(json.dumps(json.loads(result_file.read_text())
                                              | {"process_seconds": process_seconds}))
        return json.loads(result_file.read_text())

    rows = []
    points = [f"{fmt}@{CALIBRATION_SEQUENCES}" for fmt in args.formats]
    points += [args.long_calibration] if args.long_calibration else []
    for point in points:
        runs = {"nemo_optim": [], "modelopt_hf": []}
        for run in range(args.repeats):  # the sides alternate, so a slow spell of the machine hits both
            for side in runs:
                runs[side].append(measured(side, point, run))
        results = {}
        for side, side_runs in runs.items():
            results[side] = side_runs[0] | {key: statistics.median(r[key] for r in side_runs)
                                            for key in ("wall_seconds", "process_seconds", "peak_rss_gib")}
            results[side]["runs"] = len(side_runs)
            evaluation = measured(f"{side}_eval", point)
            results[side] |= {k: v for k, v in evaluation.items() if k != "process_seconds"}
        fmt, sequences = _parse(point)
        hf_side = results["modelopt_hf"]
        ours, theirs = results["nemo_optim"].pop("per_sequence", None), hf_side.pop("per_sequence", None)
        for metric, column in (("perplexity", "ppl_vs_hf"), ("kl", "kl_vs_hf"), ("top1_agreement", "top1_vs_hf")):
            if ours is None or theirs is None:  # an evaluation cached in --work-dir by an older version
                break
            low, high = paired_interval(ours, theirs, metric)
            difference = results["nemo_optim"][metric] - hf_side[metric]
            results["nemo_optim"][column] = f"{difference:+.4g} [{low:+.3g}, {high:+.3g}]"
        for side, label in (("nemo_optim", "nemo-optim ptq"), ("modelopt_hf", "ModelOpt HF path")):
            rows.append({"format": fmt, "calibration_sequences": sequences, "row": label, "point": f"{point} {label}",
                         **results[side],
                         "wall_vs_hf": results[side]["wall_seconds"] / hf_side["wall_seconds"],
                         "process_vs_hf": results[side]["process_seconds"] / hf_side["process_seconds"]})
        print(rows[-2:], flush=True)
    previous = previous_results("ptq_vs_modelopt_hf", args.out)
    for row in previous.get("rows", []):  # rows of files written before rows had a point
        row.setdefault("point", f"{row['format']}@{row['calibration_sequences']} {row['row']}")
    order = [f"{fmt}@{CALIBRATION_SEQUENCES} {label}"
             for fmt in FORMATS for label in ("nemo-optim ptq", "ModelOpt HF path")]
    order += [f"{LONG_CALIBRATION} {label}" for label in ("nemo-optim ptq", "ModelOpt HF path")]
    rows, reused = merge_previous_rows(rows, previous, order, key="point")
    notes = (f"{torch.get_num_threads()} threads. " + " ".join(__doc__.split("\n\n")[1].split())
             + (f" Rows kept from the previous run: {', '.join(reused)}." if reused else "") + " " + args.note).strip()
    write_results("ptq_vs_modelopt_hf", rows, [
        ("format", "format"), ("calibration_sequences", "calib. rows"), ("row", "path"), ("perplexity", "ppl"),
        ("kl", "KL"), ("top1_agreement", "top-1"),
        ("ppl_vs_hf", "ppl - HF's [95%]"), ("kl_vs_hf", "KL - HF's [95%]"), ("top1_vs_hf", "top-1 - HF's [95%]"),
        ("wall_seconds", "load->export s"), ("wall_vs_hf", "vs HF path"), ("process_seconds", "command s"),
        ("process_vs_hf", "command vs HF path"), ("peak_rss_gib", "peak RSS (GiB)"),
        ("export", "export"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
