"""Run under torchrun: loads a model at the given TP/PP, compares its logits with a file of
expected logits (computed at TP=1/PP=1), optionally saves a checkpoint at this TP/PP.
Exits non-zero on mismatch."""

import argparse
import sys

import torch

from nemo_optim import checkpoint, runtime
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--expected", required=True, help="torch file with 'tokens' and 'logits'")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--save", default=None)
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()
    expected = torch.load(args.expected)
    parallel = runtime.ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    with runtime.parallel_runtime(parallel):
        loaded = load_model(args.model)
        logits = forward_logits(loaded.model, expected["tokens"])
        failed = False
        if logits is not None:
            diff = (logits - expected["logits"]).abs().max().item()
            print(f"rank {runtime.rank()}: TP={args.tp} PP={args.pp} max |logit diff| = {diff:.3e}", flush=True)
            failed = diff > args.atol
        if args.save:
            checkpoint.save_checkpoint(loaded.model, loaded.config, args.save, loaded.hf_dir,
                                       producer={"stage": "test"})
        flags = torch.tensor([int(failed)])
        torch.distributed.all_reduce(flags)
    return int(flags.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
