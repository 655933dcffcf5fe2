"""Speculative decoding on SmolLM2-135M-Instruct (fp32, CPU): draft heads trained by the
`speculative` stage on the model's own greedy continuations of embedded-corpus prompts, measured
on held-out prompts (the validation split, never trained on) at draft lengths 1-5: acceptance
length, tokens/s against plain KV-cached greedy decoding of the same model, identical outputs.

    .venv/bin/python -m benchmarks.speculative                              # all rows
    .venv/bin/python -m benchmarks.speculative --rows medusa_with_corpus    # one row; other rows are kept
Writes benchmarks/results/speculative.json and speculative.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import check_rows, previous_results, results_arguments, write_results
from nemo_optim.data.corpus import DataConfig
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.speculative.config import SpeculativeConfig
from nemo_optim.speculative.data import SelfDistillationConfig
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig
from nemo_optim.stages.speculative import speculative
from nemo_optim.training import TrainingConfig

MODEL = SMOLLM2
DRAFT_LENGTHS = [1, 2, 3, 4, 5]
# EAGLE-3: one draft decoder layer on three base layers' hidden states; its LM head predicts the
# 8192 most frequent tokens of the training text (a sixth of the base head's cost per draft)
EAGLE3 = SpeculativeConfig(algorithm="eagle3", num_draft_tokens=4, draft_vocab_size=8192)
# row -> (draft, optimizer steps, also train on the corpus's own text): up to ~30 min of training on 2 cores
ROWS = {
    "eagle3": (EAGLE3, 200, False),
    "eagle3_with_corpus": (EAGLE3, 300, True),
    # Medusa: 5 heads, each a residual block + a full-vocabulary LM head (ModelOpt's layout): ~20 s/step
    "medusa_with_corpus": (SpeculativeConfig(algorithm="medusa", num_draft_tokens=4, num_medusa_heads=5), 60, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results_arguments(parser, list(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every row (default: the row's)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prompts", type=int, default=256, help="self-distillation prompts (training split)")
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    check_rows(parser, args.rows, list(ROWS))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="speculative-bench-"))
    data = DataConfig(source="embedded", seq_length=256)
    evaluation = SpeculativeEvaluationConfig(num_prompts=args.eval_prompts, prompt_tokens=64,
                                             max_new_tokens=args.max_new_tokens, draft_lengths=DRAFT_LENGTHS)
    rows = []
    for name in args.rows:
        config, steps, with_corpus = ROWS[name]
        steps = args.steps or steps
        self_distillation = SelfDistillationConfig(num_prompts=args.prompts, prompt_tokens=32, continuation_tokens=224,
                                                   with_source_text=with_corpus)
        training = TrainingConfig(max_steps=steps, global_batch_size=8, micro_batch_size=4, lr=args.lr,
                                  min_lr=args.lr / 10, warmup_steps=max(steps // 20, 1),
                                  val_check_interval=max(steps // 4, 1), checkpoint_interval=0,
                                  num_val_sequences=8, log_interval=10)
        began = time.perf_counter()
        result = speculative(model_path=MODEL, output_path=str(work / name), speculative_config=config,
                             data=data, self_distillation=self_distillation, training=training, evaluation=evaluation,
                             resume=False, overwrite=True)
        stage_seconds = time.perf_counter() - began
        train_minutes = result.training.seconds_per_step * steps / 60
        for measured in result.evaluation["results"]:
            rows.append({
                "row": name, "algorithm": config.algorithm, **measured, "training_steps": steps,
                "data": f"self-distilled ({args.prompts} prompts)" + (" + corpus text" if with_corpus else ""),
                "training_tokens": steps * training.global_batch_size * data.seq_length,
                "training_minutes": train_minutes, "stage_minutes": stage_seconds / 60,
                "final_validation_loss": result.training.last("validation").get("loss"),
                "config": dataclasses.asdict(config), "measured": datetime.date.today().isoformat(),
            })
    # one line per draft length: a row kept from the last run keeps all of its lines
    rows = [row for row in previous_results("speculative", args.out).get("rows", [])
            if row["row"] not in args.rows] + rows
    notes = (
        f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32) on CPU, {torch.get_num_threads()} threads, "
        f"batch 1. Drafts trained by the `speculative` stage with the base model frozen: {args.prompts} prompts of "
        f"32 tokens from the embedded corpus's training split, each continued greedily by the base model for up "
        f"to 224 tokens (self-distillation), packed into 256-token rows (256 prompts: 254 rows, 65k tokens); "
        f"rows 'with_corpus' also train on the corpus's own training split (739 rows, 190k tokens), where EAGLE's "
        f"targets are still the base model's distributions; the row's steps x 8 rows, AdamW at lr "
        f"{args.lr} (warmup, cosine to lr/10). 'training minutes' is the optimizer steps' time; 'stage minutes' "
        f"adds loading, data generation (cached between rows), validation and the measurement. Measured on "
        f"{args.eval_prompts} held-out prompts (64 tokens from the validation split's documents), "
        f"{args.max_new_tokens} new tokens each; chain drafts; acceptance length = tokens emitted per verifying "
        f"base forward "
        f"(accepted drafts + 1); speed-up = plain greedy decoding with a KV cache (transformers, same model, "
        f"same prompts) / speculative decoding, wall time including prefill. 'identical' counts prompts whose "
        f"output equals plain greedy decoding token for token. {args.note}").strip()
    write_results("speculative", rows, [
        ("row", "draft"), ("data", "training text"), ("draft_length", "draft tokens"),
        ("acceptance_length", "acceptance length"),
        ("tokens_per_second", "tokens/s"), ("baseline_tokens_per_second", "greedy tokens/s"),
        ("speedup", "speed-up"), ("identical_prompts", "identical"), ("training_tokens", "training tokens"),
        ("training_minutes", "training minutes"), ("stage_minutes", "stage minutes"), ("measured", "measured"),
    ], notes, args.out, extra={"args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
