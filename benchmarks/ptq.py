"""PTQ quality on SmolLM2-135M-Instruct (fp32, CPU): raw ModelOpt presets vs nemo-optim recipes.

Every row calibrates on the same sequences (calibration split of Python's pydoc text) and is
evaluated on the same held-out text of another domain (standard-library docstrings), against
the unquantized model: perplexity and its change, KL, top-1 agreement, calibration seconds,
effective bits per decoder weight (scales included), share of decoder linear weights quantized,
estimated weight size. Also nemo-optim's PTQ wall time over raw `mtq.quantize` on one config.

    .venv/bin/python -m benchmarks.ptq                    # all rows (--rows for a subset)
    .venv/bin/python -m benchmarks.ptq --rows fp8 --eval-sequences 4 --calib-sequences 8   # smoke
Writes benchmarks/results/ptq.json and ptq.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time

import modelopt.torch.quantization as mtq

from benchmarks.common import (
    check_rows,
    merge_previous_rows,
    previous_results,
    reference_on_held_out,
    results_arguments,
    write_results,
)
from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.evaluation import evaluate_model
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model
from nemo_optim.quantization.config import QuantizationConfig
from nemo_optim.quantization.quantizer import auto_quantize, quantize, summarize

MODEL = SMOLLM2

# row name -> ("raw", ModelOpt preset) or ("recipe", QuantizationConfig overrides)
ROWS: dict[str, tuple[str, object]] = {
    "raw FP8_DEFAULT": ("raw", "FP8_DEFAULT_CFG"),
    "raw FP8_PER_CHANNEL_PER_TOKEN": ("raw", "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
    "raw INT8_DEFAULT": ("raw", "INT8_DEFAULT_CFG"),
    "raw INT8_SMOOTHQUANT": ("raw", "INT8_SMOOTHQUANT_CFG"),
    "raw INT4_AWQ": ("raw", "INT4_AWQ_CFG"),
    "raw W4A8_AWQ": ("raw", "W4A8_AWQ_BETA_CFG"),
    "fp8 (preset calibration)": ("recipe", {"algorithm": "fp8", "calibration_algorithm": "preset"}),
    "fp8": ("recipe", {"algorithm": "fp8"}),
    "fp8_pc_pt": ("recipe", {"algorithm": "fp8_pc_pt"}),
    "fp8 (preset calibration), weights only": ("recipe", {"algorithm": "fp8", "calibration_algorithm": "preset",
                                                          "exclude_modules": ["*input_quantizer"]}),
    "fp8_pc_pt, weights only": ("recipe", {"algorithm": "fp8_pc_pt", "exclude_modules": ["*input_quantizer"]}),
    "fp8_pc_pt (preset calibration), activations only": ("recipe", {"algorithm": "fp8_pc_pt",
                                                                    "calibration_algorithm": "preset",
                                                                    "exclude_modules": ["*weight_quantizer"]}),
    "fp8 auto_quantize 8.38 bits": ("recipe", {"algorithm": "fp8", "auto_quantize_bits": 8.38,
                                               "auto_quantize_formats": ["fp8"]}),
    "fp8_pc_pt auto_quantize 8.38 bits": ("recipe", {"algorithm": "fp8_pc_pt", "auto_quantize_bits": 8.38,
                                                     "auto_quantize_formats": ["fp8_pc_pt"]}),
    "int8_sq alpha 0.5 (NeMo 2's nominal default)": ("recipe", {"algorithm": "int8_sq", "sq_alpha": 0.5}),
    "int8_sq alpha 0.8": ("recipe", {"algorithm": "int8_sq", "sq_alpha": 0.8}),
    "int8_sq auto_quantize 8.38 bits": ("recipe", {"algorithm": "int8_sq", "auto_quantize_bits": 8.38,
                                                   "auto_quantize_formats": ["int8_sq"]}),
    "int4 block 32": ("recipe", {"algorithm": "int4", "awq_block_size": 32}),
    "int4_awq block 64": ("recipe", {"algorithm": "int4_awq", "awq_block_size": 64}),
    "w4a8_awq block 64": ("recipe", {"algorithm": "w4a8_awq", "awq_block_size": 64}),
}


def _wall_time_ratio(forward_loop, repeats: int) -> float:
    """Median over alternating runs of nemo-optim's quantize / raw mtq.quantize, FP8 with max
    calibration (the same ModelOpt config), on the same forward loop: nemo-optim's overhead."""
    raw_seconds, ours_seconds = [], []
    config = QuantizationConfig(algorithm="fp8", calibration_algorithm="preset")
    for _ in range(repeats):
        for seconds, run in ((raw_seconds, lambda m: mtq.quantize(m, copy.deepcopy(mtq.FP8_DEFAULT_CFG), forward_loop)),
                             (ours_seconds, lambda m: quantize(m, config, forward_loop))):
            model = load_model(MODEL).model
            began = time.perf_counter()
            run(model)
            seconds.append(time.perf_counter() - began)
            del model
    print({"raw_seconds": raw_seconds, "nemo_optim_seconds": ours_seconds}, flush=True)
    return statistics.median(ours_seconds) / statistics.median(raw_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results_arguments(parser, list(ROWS))
    parser.add_argument("--calib-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="alternating raw / nemo-optim FP8 runs for the wall-time ratio (0: skip)")
    args = parser.parse_args()
    check_rows(parser, args.rows, list(ROWS))
    previous = previous_results("ptq", args.out) if set(args.rows) != set(ROWS) else {}
    wall_time = previous.get("wall_time_ratio")  # kept when this run does not time

    rows = []
    with runtime.parallel_runtime():
        base, tokenizer, held_out, reference = reference_on_held_out(MODEL, args.seq_length, args.eval_sequences)
        calib_rows = packed_sequences(DataConfig(source="embedded:pydoc", seq_length=args.seq_length),
                                      "calibration", tokenizer, args.calib_sequences)
        batches = list(calib_rows.split(4))

        def forward_loop(model):
            for batch in batches:
                forward_logits(model, batch)

        rows.append({"row": "Q4_1 GGUF as fp32 (reference)", "perplexity": reference.perplexity,
                     "ppl_change_percent": 0.0, "effective_bits": 32.0, "quantized_share": 0.0})
        for name in args.rows:
            kind, spec = ROWS[name]
            model = load_model(MODEL).model
            began = time.perf_counter()
            if kind == "raw":
                model = mtq.quantize(model, copy.deepcopy(getattr(mtq, spec)), forward_loop)
                summary = summarize(model, spec)
            else:
                config = QuantizationConfig(calibration_dataset_size=args.calib_sequences,
                                            calibration_seq_len=args.seq_length, **spec)
                if config.auto_quantize_bits is not None:  # calibrates on the same rows as forward_loop
                    model, summary = auto_quantize(model, config, tokenizer,
                                                   fresh_model=lambda: load_model(MODEL).model)
                else:
                    model, summary = quantize(model, config, forward_loop)
            seconds = time.perf_counter() - began
            result = evaluate_model(model, held_out, reference=base.model)
            num_params = base.config.num_parameters()
            decoder_linear = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
            size_mb = (decoder_linear * summary.effective_bits + (num_params - decoder_linear) * 16) / 8 / 2**20
            rows.append({
                "row": name, "perplexity": result.perplexity,
                "ppl_change_percent": 100 * (result.perplexity / reference.perplexity - 1),
                "kl": result.kl_to_reference, "top1_agreement": result.top1_agreement,
                "calibration_seconds": seconds, "effective_bits": summary.effective_bits,
                "quantized_share": summary.quantized_linear_share, "estimated_size_mb": size_mb,
                "measured": datetime.date.today().isoformat(),
            })
            print(rows[-1], flush=True)
            write_ptq_results(args, rows, previous, wall_time)  # a later row's failure keeps this one
            del model
        if args.timing_repeats:
            wall_time = {"ratio": _wall_time_ratio(forward_loop, args.timing_repeats), "repeats": args.timing_repeats,
                         "measured": datetime.date.today().isoformat()}
    write_ptq_results(args, rows, previous, wall_time)


def write_ptq_results(args, rows: list[dict], previous: dict, wall_time: dict | None) -> None:
    """ptq.json / ptq.md: `rows` measured now, the other rows kept from `previous`."""
    rows, reused = merge_previous_rows(rows, previous, ["Q4_1 GGUF as fp32 (reference)", *ROWS])
    notes = (f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32: its decoder weights already carry 4-bit "
             f"rounding) on CPU. Calibration: {args.calib_sequences} x {args.seq_length} tokens of "
             f"pydoc text (calibration split). Held out: {args.eval_sequences} x {args.seq_length} tokens of stdlib "
             f"docstrings (another domain). Estimated size: decoder linears at effective bits, the rest at 16 bits. "
             f"Rows without a suffix use nemo-optim's default calibration (TUNED_CALIBRATION: the preset's method, "
             f"then GPTQ-lite); 'preset calibration' is ModelOpt's preset method alone; 'weights only' disables "
             f"every activation quantizer and 'activations only' every weight quantizer (ablations: what the "
             f"weights or the activations alone cost; with activations only the weights stay fp32, so the quantized "
             f"share is 0); 'auto_quantize B bits' is ModelOpt's auto_quantize choosing per layer between the format "
             f"and 16 bits by gradient sensitivity on the calibration rows, under B bits as ModelOpt counts them "
             f"(format bits without scales, unquantized 16), "
             f"which keeps >= 95% of the decoder's linear weights quantized (see 'quantized share'); when every "
             f"candidate format's default is GPTQ-lite, the chosen formats are then re-calibrated with max + GPTQ-lite "
             f"on a fresh copy of the model. "
             f"nemo-optim PTQ wall time / raw mtq.quantize on the same config (FP8_DEFAULT, max calibration): "
             + ("not measured." if wall_time is None else
                f"{wall_time['ratio']:.3f} (median of {wall_time['repeats']} alternating runs each, "
                f"measured {wall_time['measured']})."))
    if reused:
        notes += (f" Rows kept from an earlier run of this script with the same arguments (the package may have "
                  f"changed in between: see each row's date): {', '.join(reused)}.")
    if args.note:
        notes += " " + args.note
    write_results("ptq", rows, [
        ("row", "config"), ("perplexity", "ppl"), ("ppl_change_percent", "ppl change %"), ("kl", "KL"),
        ("top1_agreement", "top-1"), ("calibration_seconds", "calib s"), ("effective_bits", "bits/weight"),
        ("quantized_share", "quantized share"), ("estimated_size_mb", "size MB (est.)"), ("measured", "measured"),
    ], notes, args.out, extra={"wall_time_ratio": wall_time})




if __name__ == "__main__":
    main()
