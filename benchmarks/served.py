"""The payoff, served: SmolLM2-135M (its GGUF dequantized to fp32 is the reference), its pruned and
distilled 18-layer students and each compressed-tensors export vLLM's CPU engine runs, served by
vLLM (one engine process per model, the same prompts and settings, one after the other).

Per row: decode and prefill tokens/s, time to first token, the engine's resident memory and the
export's weight bytes, the linear kernel vLLM chose, the engine's agreement with nemo-optim's own
model (top-1 and KL over vLLM's top-20 on held-out prompts), and the evaluate stage's perplexity,
KL / top-1 to the original and task accuracy. Rows whose decode is slower than fp32 get a per-op
profile of the first layer's linears at decode shape (microseconds, bytes read, GB/s).

    .venv/bin/python -m benchmarks.served                       # builds what is missing
    .venv/bin/python -m benchmarks.served --rows "int8 W8A8"    # one row; others kept
Artifacts go to --work-dir (default outputs/served) and are reused; writes
benchmarks/results/served.json and served.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.common import check_rows, merge_previous_rows, previous_results, results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.accuracy.multiple_choice import AccuracyConfig
from nemo_optim.data.corpus import DataConfig
from nemo_optim.evaluation import EvaluationConfig
from nemo_optim.models.hf import SMOLLM2, embedded_model_path, gguf_to_hf
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.pruning.config import PruningConfig
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.serving import compare_with_engine, engine_job, reference_outputs, run_engine
from nemo_optim.speculative.data import document_prompts
from nemo_optim.stages.distill import distill
from nemo_optim.stages.evaluate import evaluate
from nemo_optim.stages.prune import prune
from nemo_optim.stages.ptq import ptq
from nemo_optim.training import TrainingConfig

# the 12 layers before the last dropped (30 -> 18): what the compress pipeline's depth pruning keeps
DROPPED = list(range(18, 30))
NOT_O_PROJ = ["*linear_proj*"]  # SmoothQuant/AWQ o_proj scales do not fold under GQA (9 heads, 3 KV groups)
QUANTIZED = {  # row -> (algorithm, exclusions)
    "int8 W8A8": ("int8", []),
    "int8_sq W8A8": ("int8_sq", NOT_O_PROJ),
    "fp8_pc_pt FP8-dynamic": ("fp8_pc_pt", []),
    "int4 W4A16": ("int4", []),
    "int4_awq W4A16": ("int4_awq", NOT_O_PROJ),
}
ROWS = ["original fp32", "original bf16", "pruned 18L fp32", "distilled 18L fp32", *QUANTIZED]


def _build(row: str, work: Path, distill_steps: int) -> tuple[Path, str, str]:
    """(export directory, engine dtype, nemo-optim model path it is compared with), built once."""
    if row == "original fp32":
        return gguf_to_hf(embedded_model_path(SMOLLM2)), "float32", SMOLLM2
    if row == "original bf16":
        path = work / "original_bf16"
        if not path.exists():
            ptq(model_path=SMOLLM2, quantization_config=QuantizationConfig(algorithm=None),
                export_config=ExportConfig(path=str(path), dtype="bf16"))
        return path, "bfloat16", SMOLLM2
    if row.startswith("pruned") or row.startswith("distilled"):
        if not (work / "pruned").exists():
            prune(model_path=SMOLLM2, output_path=str(work / "pruned"), hf_export_path=str(work / "pruned_hf"),
                  pruning_config=PruningConfig(drop_layers=[i + 1 for i in DROPPED]))
        if row.startswith("pruned"):
            return work / "pruned_hf", "float32", str(work / "pruned")
        if not (work / "distilled").exists():
            distill(model_path=str(work / "pruned"), teacher_model_path=SMOLLM2,
                    output_path=str(work / "distilled"),
                    hf_export_path=str(work / "distilled_hf"), data=DataConfig(seq_length=256), resume=False,
                    training=TrainingConfig(max_steps=distill_steps, global_batch_size=4, micro_batch_size=4, lr=1e-3,
                                            min_lr=1e-4, warmup_steps=max(distill_steps // 10, 1), val_check_interval=0,
                                            checkpoint_interval=0))
        return work / "distilled_hf", "float32", str(work / "distilled")
    algorithm, excluded = QUANTIZED[row]
    path = work / algorithm
    if not path.exists():
        # (INT4 blocks of 64: 128 does not divide SmolLM2's hidden size, 576)
        quantization = QuantizationConfig(algorithm=algorithm, exclude_modules=excluded, awq_block_size=64)
        ptq(model_path=SMOLLM2, quantization_config=quantization,
            export_config=ExportConfig(path=str(path), export_format="compressed_tensors", dtype="bf16"))
    return path, "bfloat16", f"{path}_native"


def _quality(row: str, model_path: str, work: Path, items: int) -> dict:
    """The evaluate stage's numbers (perplexity, KL / top-1 to the fp32 original, task accuracy)."""
    out = work / "evaluation" / f"{row.replace(' ', '_')}.json"
    if not out.exists():
        evaluate(model_path=model_path, reference_model_path=SMOLLM2, output_path=str(out),
                 evaluation=EvaluationConfig(num_sequences=8, accuracy=AccuracyConfig(num_items=items)))
    result = json.loads(out.read_text())
    accuracy = result.get("task_accuracy") or {}
    return {"perplexity": result["perplexity"], "kl_to_original": result.get("kl_to_reference"),
            "top1_to_original": result.get("top1_agreement"), "accuracy_norm": accuracy.get("accuracy_norm")}


def _weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/served"))
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts (prefill batch and agreement)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--accuracy-items", type=int, default=200)
    results_arguments(parser, ROWS)
    args = parser.parse_args()
    check_rows(parser, args.rows, ROWS)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    built = {row: _build(row, args.work_dir, args.distill_steps) for row in args.rows}
    prompts = document_prompts(DataConfig(), "validation", load_tokenizer(built[args.rows[0]][0]), args.prompts,
                               args.prompt_tokens)
    references = {}
    with runtime.parallel_runtime(runtime.ParallelConfig()):
        for row, (_, _, model_path) in built.items():
            references[row] = reference_outputs(load_model(model_path).model, prompts, 16)
    rows = []
    for row, (path, dtype, model_path) in built.items():
        job = engine_job(row, path, prompts, dtype=dtype, prompt_logprobs=20, max_model_len=1024, profile_linears=True,
                         timing={"decode_tokens": args.decode_tokens, "decode_prompts": 1, "repeats": 3})
        # one engine process per model, alone; its one worker may use both cores
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
        result = run_engine([job], log_path=args.work_dir / f"engine_{row.replace(' ', '_')}.log", env=env)[0]
        if "error" in result:
            raise SystemExit(f"{row}: the engine failed: {result['error']}")
        agreement = compare_with_engine(*references[row][:1], result, references[row][1])
        rows.append({"row": row, "path": str(path), "engine_dtype": dtype,
                     "decode_tokens_per_s": result["timing"]["decode_tokens_per_s"],
                     "prefill_tokens_per_s": result["timing"]["prefill_tokens_per_s"],
                     "ttft_ms": result["timing"]["ttft_s"] * 1e3, "rss_mib": result["rss_bytes"] / 2**20,
                     "weight_mib": _weight_bytes(Path(path)) / 2**20,
                     "kernel": result["linear_methods"].get("qkv_proj", "-").split(" / ")[-1],
                     "engine_top1": agreement.top1_agreement, "engine_kl": agreement.mean_kl,
                     "linears": result.get("linears"), "timing_runs": result["timing"]["runs"],
                     **_quality(row, model_path, args.work_dir, args.accuracy_items)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("linears", "timing_runs")}), flush=True)

    rows, reused = merge_previous_rows(rows, previous_results("served", args.out), ROWS)
    base = next((r for r in rows if r["row"] == "original fp32"), None)
    for row in rows:
        if base:
            row["decode_vs_fp32"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["weight_vs_fp32"] = row["weight_mib"] / base["weight_mib"]
    columns = [("row", "model"), ("engine_dtype", "dtype"), ("kernel", "vLLM linear kernel"),
               ("decode_tokens_per_s", "decode tok/s"), ("decode_vs_fp32", "x fp32"),
               ("prefill_tokens_per_s", "prefill tok/s"), ("ttft_ms", "TTFT ms"), ("rss_mib", "RSS MiB"),
               ("weight_mib", "weights MiB"), ("weight_vs_fp32", "x fp32 bytes"), ("engine_top1", "engine top-1"),
               ("engine_kl", "engine KL"), ("perplexity", "ppl"), ("kl_to_original", "KL to orig"),
               ("accuracy_norm", "task acc")]
    notes = (f"vLLM (vllm-cpu 0.32.0) on this machine (2 cores, AVX2), one engine process per model, `enforce_eager`. "
             f"{args.prompts} held-out prompts of {args.prompt_tokens} tokens; decode = one prompt to "
             f"{args.decode_tokens} new tokens (EOS ignored) minus its time to first token; prefill = the "
             f"{args.prompts} prompts with one new token; medians of 3. 'engine top-1 / KL': vLLM's prompt "
             f"log-probabilities (top 20 + the rest as one bucket) against nemo-optim's own model of that row "
             f"(the fake-quantized one for quantized rows). ppl / KL to orig / task acc: the evaluate stage "
             f"(8 x 256 held-out tokens; stdlib-cloze, {args.accuracy_items} items, normalized accuracy). "
             f"The fp32 original is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32."
             + (f" Rows kept from the previous run: {', '.join(reused)}." if reused else "")
             + (f" {args.note}" if args.note else ""))
    write_results("served", rows, columns, notes, args.out)


if __name__ == "__main__":
    main()
