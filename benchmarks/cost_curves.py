"""How PTQ and distillation costs grow on CPU: PTQ calibration time and peak RSS against the number
of calibration sequences and against model size, and a KD step's time against sequence length.
Each point runs in its own process (its peak RSS is its own), started as nemo-optim's executors
start CPU jobs (glibc's tcache off: `cpu.cpu_allocator_env`).

PTQ: FP8 with ModelOpt's preset max calibration, 256-token sequences of pydoc text, batches of 4;
on SmolLM2 also with GPTQ-lite after it (nemo-optim's FP8 default), with auto_quantize (fp8 or 16
bits per layer under 8.38 bits; its sensitivity pass backward one row at a time, each decoder layer
recomputed; the choice re-calibrated with GPTQ-lite on a fresh copy of the model), and as the
whole ptq stage (load, calibrate, native checkpoint, unified HF export; its "calibration s" is the
stage's). Models:
the tiny test Llama (2 layers, hidden 64), SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to
fp32), and a random model of SmolLM2's shape at twice its width (hidden 1152, MLP 3072, 18/6
heads). "Model memory" is the fp32 weights; "RSS over baseline" is the process's peak RSS minus its
resident memory after the imports, before any model is built (the imports' own transient
peak is in "peak RSS" too).
KD: forward + backward of one step (2 micro-batches of 2 sequences; optimizer excluded) of SmolLM2
-> `make run`'s 18-layer pruned student, logit KL, median of 3 after one warm-up.

    .venv/bin/python -m benchmarks.cost_curves
Writes benchmarks/results/cost_curves.{json,md} and cost_curves.png.
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

from benchmarks.common import nemo_optim_process_env, results_arguments, write_results
from nemo_optim.models.hf import SMOLLM2

SAMPLES = (16, 64, 256)
SEQ_LENGTHS = (128, 256, 512)


def _rss_gib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _wide_model(directory: Path) -> Path:
    """A random Llama of SmolLM2's depth and vocabulary at twice its width, with its tokenizer."""
    import torch
    import transformers

    from nemo_optim.models.hf import gguf_to_hf
    from nemo_optim.models.loader import resolve_source

    if (directory / "config.json").is_file():
        return directory
    source = gguf_to_hf(resolve_source(SMOLLM2).path)
    config = transformers.AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size = 2 * config.hidden_size, 2 * config.intermediate_size
    config.num_attention_heads, config.num_key_value_heads = 18, 6
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


# how the model is quantized at a point: FP8 with ModelOpt's preset max calibration, with nemo-optim's
# default FP8 calibration (max, then GPTQ-lite), with auto_quantize (fp8 or 16 bits per layer, then
# the chosen formats re-calibrated on a fresh copy, as the ptq stage does), or the whole ptq stage
# (load, calibrate, native checkpoint, unified HF export)
PTQ_METHODS = {"ptq": "FP8 max", "ptq_gptq": "FP8 max + GPTQ-lite", "ptq_auto": "FP8 auto_quantize 8.38 bits",
               "ptq_stage": "FP8 max, whole ptq stage"}


def ptq_point(model_path: str, samples: int, method: str = "ptq", work_dir: str | None = None) -> dict:
    import torch

    from nemo_optim import cpu, runtime
    from nemo_optim.models.loader import load_model, load_tokenizer, read_model_config
    from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
    from nemo_optim.quantization.quantizer import auto_quantize, calibration_loop, quantize
    from nemo_optim.stages.ptq import ptq

    config = QuantizationConfig(algorithm="fp8", calibration_algorithm=None if method == "ptq_gptq" else "preset",
                                calibration_dataset_size=samples, calibration_seq_len=256)
    if method == "ptq_auto":
        config = QuantizationConfig(algorithm="fp8", auto_quantize_bits=8.38, auto_quantize_formats=["fp8"],
                                    calibration_dataset_size=samples, calibration_seq_len=256)
    import megatron.core.models.gpt  # noqa: F401  the libraries PTQ loads, imported before the baseline
    import modelopt.torch.export  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401
    import transformers  # noqa: F401

    baseline = _current_rss_gib()  # after the imports (their own peak can exceed a small model's)
    began = time.perf_counter()
    if method == "ptq_stage":
        ptq(model_path=model_path, quantization_config=config, overwrite=True,
            export_config=ExportConfig(path=str(Path(work_dir) / f"stage_{samples}"), generate_sample=False))
        peak = _rss_gib()
        parameters = read_model_config(model_path)[0].num_parameters()
    else:  # (as a stage runs: with its CPU adaptations)
        with runtime.parallel_runtime(), cpu.adapted():
            loaded = load_model(model_path)
            parameters = sum(p.numel() for p in loaded.model.parameters())
            tokenizer = load_tokenizer(loaded.hf_dir)
            began = time.perf_counter()
            if method == "ptq_auto":
                auto_quantize(loaded.model, config, tokenizer, fresh_model=lambda: load_model(model_path).model)
            else:
                quantize(loaded.model, config, calibration_loop(config, tokenizer))
        peak = _rss_gib()
    seconds = time.perf_counter() - began
    return {"method": PTQ_METHODS[method], "parameters_m": parameters / 1e6, "model_gib": parameters * 4 / 2**30,
            "samples": samples, "calibration_seconds": seconds, "seconds_per_sample": seconds / samples,
            "peak_rss_gib": peak, "rss_over_baseline_gib": peak - baseline,
            "over_model": (peak - baseline) / (parameters * 4 / 2**30), "threads": torch.get_num_threads()}


def kd_point(student: str, seq_length: int) -> dict:
    from nemo_optim import cpu, runtime
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.data.packing import packed_sequences
    from nemo_optim.distillation.config import load_distillation_config
    from nemo_optim.distillation.model import DistillationLossReduction, build_distillation_model, teacher_provider
    from nemo_optim.models.forward import make_batch, run_schedule
    from nemo_optim.models.loader import load_model, load_tokenizer

    with runtime.parallel_runtime(), cpu.adapted():
        loaded = load_model(student)
        tokenizer = load_tokenizer(loaded.hf_dir)
        teacher = teacher_provider(None, SMOLLM2, tokenizer=tokenizer)
        config = load_distillation_config(None)
        model = build_distillation_model(loaded.model, teacher, config, loaded.config, loaded.config)
        model.train()
        reduction = DistillationLossReduction(model, config)
        rows = packed_sequences(DataConfig(seq_length=seq_length), "train", tokenizer, 4)
        batches = [make_batch(chunk) for chunk in rows.split(2)]

        def step():  # forward + backward of a KD step, as benchmarks/distill_step_time.py times it
            model.zero_grad(set_to_none=True)
            run_schedule(model, batches, reduction, num_micro_batches=2, seq_length=seq_length, micro_batch_size=2,
                         forward_only=False, with_labels=True)

        step()
        times = []
        for _ in range(3):
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    return {"seq_length": seq_length, "step_seconds": seconds, "tokens_per_second": 4 * seq_length / seconds,
            "peak_rss_gib": _rss_gib()}


def _run(args, point: str) -> dict:
    out = Path(args.work_dir) / f"{point.replace(':', '_').replace('/', '_')}.json"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "benchmarks.cost_curves", "--point", point, "--work-dir", args.work_dir,
                        "--student", args.student], check=True, env=nemo_optim_process_env())
    return json.loads(out.read_text())


def _plot(ptq_samples: list[dict], ptq_sizes: list[dict], ptq_stages: list[dict], kd: list[dict],
          out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["samples"] for r in ptq_samples], [r["calibration_seconds"] for r in ptq_samples], "o-")
    axes[0].set(xlabel="calibration sequences (x 256 tokens)", ylabel="seconds", title="SmolLM2 FP8 calibration time")
    axes[1].plot([r["model_gib"] for r in ptq_sizes], [r["rss_over_baseline_gib"] for r in ptq_sizes], "o-",
                 label="load + calibration")
    axes[1].plot([r["model_gib"] for r in ptq_stages], [r["rss_over_baseline_gib"] for r in ptq_stages], "s-",
                 label="whole ptq stage (+ save, export)")
    axes[1].plot([r["model_gib"] for r in ptq_sizes], [1.5 * r["model_gib"] for r in ptq_sizes], "--",
                 label="1.5x model")
    axes[1].set(xlabel="fp32 model (GiB)", ylabel="peak RSS over baseline (GiB)",
                title="PTQ FP8 memory vs model size (16 sequences)")
    axes[1].legend()
    axes[2].plot([r["seq_length"] for r in kd], [r["step_seconds"] for r in kd], "o-")
    axes[2].set(xlabel="sequence length", ylabel="seconds", title="KD step (4 sequences)")
    figure.tight_layout()
    figure.savefig(out_dir / "cost_curves.png", dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="outputs/compress_smollm2/pruned")
    parser.add_argument("--tiny", default=None,
                        help="HF dir of a tiny model (default: made like the tests' tiny Llama)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)
    results_arguments(parser)
    args = parser.parse_args()
    if args.point:  # one measurement, in its own process
        kind, model, value = args.point.split(":", 2)
        result = (ptq_point(model, int(value), kind, args.work_dir) if kind in PTQ_METHODS
                  else kd_point(model, int(value)))
        (Path(args.work_dir) / f"{args.point.replace(':', '_').replace('/', '_')}.json").write_text(json.dumps(result))
        return
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="cost-curves-")
    work = Path(args.work_dir)
    if args.tiny is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import make_tiny_hf_model, train_tiny_tokenizer

        args.tiny = str(work / "tiny")
        if not (work / "tiny" / "config.json").is_file():
            make_tiny_hf_model("llama", work / "tiny", train_tiny_tokenizer())
    # made in a child: Linux keeps a process's peak RSS across fork + exec, so a parent that held this
    # model would set a floor under every measured child's peak
    subprocess.run([sys.executable, "-c", f"from benchmarks.cost_curves import _wide_model; "
                    f"from pathlib import Path; _wide_model(Path({str(work / 'wide')!r}))"], check=True)
    wide = str(work / "wide")
    ptq_samples = [dict(_run(args, f"ptq:{SMOLLM2}:{n}"), model="SmolLM2") for n in SAMPLES]
    models = (("tiny Llama", args.tiny), ("SmolLM2", SMOLLM2), ("SmolLM2 x2 width (random)", wide))
    ptq_sizes = [dict(_run(args, f"ptq:{path}:16"), model=label) for label, path in models]
    ptq_methods = [dict(_run(args, f"{method}:{SMOLLM2}:16"), model="SmolLM2") for method in ("ptq_gptq", "ptq_auto")]
    ptq_stages = [dict(_run(args, f"ptq_stage:{path}:16"), model=label) for label, path in models[1:]]
    kd = [_run(args, f"kd:{args.student}:{n}") for n in SEQ_LENGTHS]
    rows = ([{"row": f"PTQ {r['method']}, {r['model']}, {r['samples']} sequences", **r}
             for r in ptq_samples + ptq_sizes[::2] + ptq_methods + ptq_stages]
            + [{"row": f"KD step, {r['seq_length']} tokens", **r} for r in kd])
    first = ptq_samples[0]["seconds_per_sample"]
    linearity = ", ".join(f"{r['samples']}: {r['seconds_per_sample'] / first:.2f}x" for r in ptq_samples)
    notes = (" ".join(__doc__.split("\n\n")[1].split()) + " " + " ".join(__doc__.split("\n\n")[2].split())
             + f" Calibration seconds per sequence relative to 16 sequences: {linearity}. " + args.note).strip()
    write_results("cost_curves", rows, [
        ("row", "point"), ("parameters_m", "params (M)"), ("model_gib", "model (GiB)"),
        ("calibration_seconds", "calibration s"), ("seconds_per_sample", "s / sequence"),
        ("peak_rss_gib", "peak RSS (GiB)"), ("rss_over_baseline_gib", "RSS over baseline (GiB)"),
        ("over_model", "over baseline / model"),
        ("step_seconds", "KD step s"), ("tokens_per_second", "KD tokens/s"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})
    _plot(ptq_samples, ptq_sizes, ptq_stages, kd, args.out)


if __name__ == "__main__":
    main()
