"""Run under torchrun: per-choice log-likelihoods of a task's items and greedy continuations
at the given TP/PP, saved by rank 0 for the test to compare with one process."""

import argparse
import sys

import torch

from nemo_optim import runtime
from nemo_optim.accuracy.multiple_choice import AccuracyConfig, choice_log_likelihoods, task_items
from nemo_optim.accuracy.scoring import greedy_generate
from nemo_optim.models.loader import load_model, load_tokenizer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    parallel = runtime.ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    with runtime.parallel_runtime(parallel):
        loaded = load_model(args.model)
        tokenizer = load_tokenizer(loaded.hf_dir)
        items, examples = task_items(AccuracyConfig(task=args.task, num_fewshot=1))
        scores, _ = choice_log_likelihoods(loaded.model, tokenizer, items, examples, max_length=256, micro_batch_size=3)
        prompts = [tokenizer.encode(item.question) for item in items[:3]]
        generated = greedy_generate(loaded.model, prompts, max_new_tokens=6, max_length=256, eos_id=None,
                                    micro_batch_size=2)
        if runtime.is_main_process():
            torch.save({"scores": scores, "generated": generated}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
