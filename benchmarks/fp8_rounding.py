"""How much FP8 (E4M3) rounding adds to SmolLM2-135M's linear inputs, against the format's own floor.

Quantizes the input of every decoder linear with the activation quantizer of ModelOpt's
FP8_PER_CHANNEL_PER_TOKEN preset (dynamic, one scale per token) on held-out text, and reports the
relative rounding error ||Q(x) - x||^2 / ||x||^2 per linear kind (min / median / max over layers),
beside the same quantizer on Gaussian tokens. Both at the same level means the model's activations
lose nothing to underflow or outliers: what is left is the 3-bit mantissa, which no scale changes.

    .venv/bin/python -m benchmarks.fp8_rounding
Writes benchmarks/results/fp8_rounding.json and fp8_rounding.md.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from modelopt.torch.quantization.nn import TensorQuantizer

from benchmarks.common import results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.quantization.modelopt_config import preset_quantizer

MODEL = SMOLLM2
LINEAR_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def per_token_fp8_quantizer() -> TensorQuantizer:
    return preset_quantizer("FP8_PER_CHANNEL_PER_TOKEN_CFG")


def relative_error(quantizer: TensorQuantizer, x: torch.Tensor) -> float:
    return ((quantizer(x) - x).pow(2).sum() / x.pow(2).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    results_arguments(parser)
    args = parser.parse_args()
    quantizer = per_token_fp8_quantizer()
    squared_error, squared_norm = defaultdict(float), defaultdict(float)

    def measure(name):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            squared_error[name] += (quantizer(x) - x).pow(2).sum().item()
            squared_norm[name] += x.pow(2).sum().item()
        return hook

    with runtime.parallel_runtime():
        loaded = load_model(MODEL)
        held_out = packed_sequences(DataConfig(source="embedded:docstrings", seq_length=args.seq_length), "train",
                                    load_tokenizer(loaded.hf_dir), args.eval_sequences)
        for name, module in loaded.model.named_modules():
            if name.endswith(LINEAR_KINDS):
                module.register_forward_pre_hook(measure(name))
        with torch.no_grad():
            forward_logits(loaded.model, held_out)
        hidden = loaded.config.hidden_size

    rows = []
    for kind in LINEAR_KINDS:
        errors = [squared_error[n] / squared_norm[n] for n in squared_error if n.endswith(kind)]
        rows.append({"row": f"SmolLM2 {kind} inputs ({len(errors)} layers)", "min": min(errors),
                     "median": statistics.median(errors), "max": max(errors)})
    draws = [torch.randn(args.seq_length, hidden, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    gaussian = [relative_error(quantizer, x) for x in draws]
    rows.append({"row": f"Gaussian tokens ({hidden} wide, 8 draws)", "min": min(gaussian),
                 "median": statistics.median(gaussian), "max": max(gaussian)})
    notes = (f"Relative rounding error ||Q(x) - x||^2 / ||x||^2 of ModelOpt's FP8_PER_CHANNEL_PER_TOKEN input "
             f"quantizer (E4M3, one dynamic scale per token) on the inputs of SmolLM2-135M-Instruct's decoder "
             f"linears (the Q4_1 GGUF dequantized to fp32), {args.eval_sequences} x {args.seq_length} tokens of "
             f"held-out stdlib docstrings "
             f"(benchmarks/ptq.py's held-out text); per linear kind, min / median / max over the layers. The last "
             f"row is the same quantizer on Gaussian tokens: the format's floor when nothing underflows.")
    write_results("fp8_rounding", rows, [("row", "input"), ("min", "min"), ("median", "median"), ("max", "max")],
                  f"{notes} {args.note}".strip(), args.out)


if __name__ == "__main__":
    main()
