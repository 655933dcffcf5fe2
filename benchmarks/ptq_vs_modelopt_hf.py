"""PTQ: nemo-optim's `ptq` stage against ModelOpt's Hugging Face path (what ModelOpt's
examples/llm_ptq/hf_ptq.py does: the transformers model, `mtq.quantize` with a preset config and a
calibration forward loop, `export_hf_checkpoint`).

Both sides: SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32) on CPU, the same calibration
rows (nemo-optim's: 16 x 256 tokens of pydoc text, calibration split), ModelOpt's preset
calibration (max / SmoothQuant / AWQ-lite: what hf_ptq.py runs; nemo-optim's tuned GPTQ-lite default
is off here), INT4-AWQ at block 64 on both (SmolLM2's 576-wide layers do not take ModelOpt's 128).
Wall time: loading the model to the end of the export, each side in its own process; peak RSS of
that phase (evaluation comes after and is not counted; ModelOpt's HF exporter compresses weights in
place, so its quality is measured in another process that quantizes the same way again). nemo-optim's wall time also saves its native
checkpoint. Quality on held-out text of another domain (16 x 256 tokens of standard-library
docstrings), against each side's own fp32 model (megatron's and transformers' fp32 logits agree
to ~1e-5): perplexity, KL, top-1 agreement.

    .venv/bin/python -m benchmarks.ptq_vs_modelopt_hf                  # ~15 min on 2 cores
    .venv/bin/python -m benchmarks.ptq_vs_modelopt_hf --formats fp8    # one format
Writes benchmarks/results/ptq_vs_modelopt_hf.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import write_results
from nemo_optim.models.hf import SMOLLM2

FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG"}
AWQ_BLOCK = 64
CALIBRATION_SEQUENCES, EVAL_SEQUENCES, SEQ_LENGTH = 16, 16, 256


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _quantization_config(fmt: str):
    from nemo_optim.quantization.config import QuantizationConfig

    return QuantizationConfig(algorithm=fmt, calibration_algorithm="preset", awq_block_size=AWQ_BLOCK,
                              calibration_dataset_size=CALIBRATION_SEQUENCES, calibration_seq_len=SEQ_LENGTH)


def _held_out(tokenizer) -> torch.Tensor:
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.data.packing import packed_sequences

    return packed_sequences(DataConfig(source="embedded:docstrings", seq_length=SEQ_LENGTH), "train", tokenizer,
                            EVAL_SEQUENCES)


def _metrics(pairs) -> dict:
    """(model logits, reference logits, labels) per batch -> perplexity, KL, top-1 agreement."""
    nll = kl = agree = count = 0.0
    for logits, reference, labels in pairs:
        log_probs, ref_log_probs = F.log_softmax(logits.float(), -1), F.log_softmax(reference.float(), -1)
        nll += F.nll_loss(log_probs.flatten(0, 1), labels.flatten(), reduction="sum").item()
        kl += F.kl_div(log_probs, ref_log_probs, log_target=True, reduction="sum").item()
        agree += (logits.argmax(-1) == reference.argmax(-1)).sum().item()
        count += labels.numel()
    return {"perplexity": math.exp(nll / count), "kl": kl / count, "top1_agreement": agree / count}


def run_nemo_optim(fmt: str, work: Path) -> dict:
    from nemo_optim import runtime
    from nemo_optim.models.forward import forward_logits
    from nemo_optim.models.loader import load_model, load_tokenizer
    from nemo_optim.quantization.config import ExportConfig
    from nemo_optim.quantization.ptq import ptq

    export_format = "hf" if fmt == "fp8" else "trtllm"  # the megatron HF exporter has no INT8 / INT4-AWQ
    began = time.perf_counter()
    ptq(model_path=SMOLLM2, quantization_config=_quantization_config(fmt), overwrite=True, model_dtype="float32",
        export_config=ExportConfig(path=str(work / f"nemo_{fmt}"), export_format=export_format, dtype="fp16"))
    result = {"wall_seconds": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(), "export": export_format}
    with runtime.parallel_runtime():
        quantized, reference = load_model(work / f"nemo_{fmt}_native").model, load_model(SMOLLM2)
        rows = _held_out(load_tokenizer(reference.hf_dir))
        pairs = ((forward_logits(quantized, batch), forward_logits(reference.model, batch), batch[:, 1:])
                 for batch in rows.split(4))
        result |= _metrics(pairs)
    return result


def run_modelopt_hf(fmt: str, work: Path, evaluate: bool = False) -> dict:
    """Quantize + export (timed), or, with `evaluate`, quantize again and measure quality: the HF
    exporter compresses the weights in place, so the exported model cannot be evaluated."""
    import copy

    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    from nemo_optim.models.hf import gguf_to_hf
    from nemo_optim.models.loader import load_tokenizer, resolve_source
    from nemo_optim.quantization.quantizer import Quantizer

    hf_dir = gguf_to_hf(resolve_source(SMOLLM2).path)
    tokenizer = load_tokenizer(hf_dir)
    batches = Quantizer(_quantization_config(fmt)).calibration_batches(tokenizer)
    began = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = copy.deepcopy(getattr(mtq, FORMATS[fmt]))
    if fmt == "int4_awq":
        config["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] = AWQ_BLOCK

    def forward_loop(m):
        with torch.no_grad():
            for batch in batches:
                m(batch[:, :-1])

    mtq.quantize(model, config, forward_loop)
    if evaluate:
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            pairs = ((model(batch[:, :-1]).logits, reference(batch[:, :-1]).logits, batch[:, 1:])
                     for batch in _held_out(tokenizer).split(4))
            return _metrics(pairs)
    export = "hf"
    try:
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=str(work / f"modelopt_{fmt}"))
    except Exception as error:  # noqa: BLE001 - report what ModelOpt's exporter says, keep measuring
        export = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return {"wall_seconds": time.perf_counter() - began, "peak_rss_gib": _peak_rss_gib(), "export": export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.side:  # one (side, format), in its own process
        side, fmt = args.side.split(":")
        work = Path(args.work_dir)
        if side == "nemo_optim":
            result = run_nemo_optim(fmt, work)
        else:
            result = run_modelopt_hf(fmt, work, evaluate=side == "modelopt_hf_eval")
        (work / f"{side}_{fmt}.json").write_text(json.dumps(result))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ptq-vs-hf-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in args.formats:
        results = {}
        for side in ("nemo_optim", "modelopt_hf", "modelopt_hf_eval"):
            if not (work / f"{side}_{fmt}.json").is_file():
                subprocess.run([sys.executable, "-m", "benchmarks.ptq_vs_modelopt_hf", "--side", f"{side}:{fmt}",
                                "--work-dir", str(work)], check=True)
            results[side] = json.loads((work / f"{side}_{fmt}.json").read_text())
        results["modelopt_hf"] |= results.pop("modelopt_hf_eval")
        for side, label in (("nemo_optim", "nemo-optim ptq"), ("modelopt_hf", "ModelOpt HF path")):
            rows.append({"format": fmt, "row": label, **results[side],
                         "wall_vs_hf": results[side]["wall_seconds"] / results["modelopt_hf"]["wall_seconds"]})
        print(rows[-2:], flush=True)
    notes = (f"{torch.get_num_threads()} threads. " + " ".join(__doc__.split("\n\n")[1].split()) + " " + args.note).strip()
    write_results("ptq_vs_modelopt_hf", rows, [
        ("format", "format"), ("row", "path"), ("perplexity", "ppl"), ("kl", "KL"), ("top1_agreement", "top-1"),
        ("wall_seconds", "wall s"), ("wall_vs_hf", "wall vs HF path"), ("peak_rss_gib", "peak RSS (GiB)"),
        ("export", "export"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
