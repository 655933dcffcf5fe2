"""Run under torchrun (or as one plain process): the `ptq` stage at --tp x --pp for every
(algorithm, export format) case, each into <out>/<algorithm>-<format>; then, with --evaluate,
the logits of each <evaluate>/<algorithm>-trtllm_native checkpoint loaded at --tp x --pp,
saved as <out>/<algorithm>-logits.pt (by the process holding the last pipeline stage)."""

import argparse
import json
from pathlib import Path

import torch

from nemo_optim import runtime
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.stages.ptq import ptq

# what the matrix compares: max calibration (no GPTQ-lite) wherever the preset allows, AWQ's own search
CALIBRATION = {"int4_awq": "preset", "w4a8_awq": "preset"}


def matrix_config(algorithm: str, export_format: str) -> QuantizationConfig:
    # compressed-tensors folds SmoothQuant/AWQ input scales only without GQA: o_proj stays unquantized
    folded = export_format == "compressed_tensors" and algorithm in ("int8_sq", "int4_awq")
    return QuantizationConfig(algorithm=algorithm, calibration_dataset_size=8, calibration_seq_len=64,
                              awq_block_size=32, calibration_algorithm=CALIBRATION.get(algorithm, "max")
                              if algorithm != "int8_sq" else "preset",
                              exclude_modules=["*linear_proj*"] if folded else [])


def tokens() -> torch.Tensor:
    return torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help='JSON list of [algorithm, export_format]')
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--evaluate", default=None, help="directory of the one-process run's exports")
    args = parser.parse_args()
    out = Path(args.out)
    for algorithm, export_format in json.loads(args.cases):
        ptq(model_path=args.model, calibration_tp=args.tp, calibration_pp=args.pp,
            export_config=ExportConfig(path=str(out / f"{algorithm}-{export_format}"), export_format=export_format,
                                       dtype="float32"),
            quantization_config=matrix_config(algorithm, export_format))
    if args.evaluate:
        algorithms = sorted({algorithm for algorithm, export_format in json.loads(args.cases)
                             if export_format == "trtllm"})
        parallel = runtime.ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        with runtime.parallel_runtime(parallel):
            for algorithm in algorithms:
                model = load_model(str(Path(args.evaluate) / f"{algorithm}-trtllm_native")).model
                logits = forward_logits(model, tokens())
                if logits is not None and runtime.data_parallel_rank() == 0:
                    from megatron.core import parallel_state

                    if parallel_state.get_tensor_model_parallel_rank() == 0:
                        torch.save(logits, out / f"{algorithm}-logits.pt")
