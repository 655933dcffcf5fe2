"""Runs the `speculative` stage on a tiny model under torchrun (data parallel) or alone, with
one fixed training batch order, and writes the trained draft's weights for comparison."""

import argparse
import os

from nemo_optim.data.corpus import DataConfig
from nemo_optim.speculative.config import SpeculativeConfig
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig
from nemo_optim.stages.speculative import speculative
from nemo_optim.training import TrainingConfig

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = speculative(
        model_path=args.model, output_path=args.output, devices=world,
        speculative_config=SpeculativeConfig(algorithm="eagle3", num_draft_tokens=2, ttt_steps=1),
        data=DataConfig(seq_length=32),
        training=TrainingConfig(max_steps=3, global_batch_size=4, micro_batch_size=2 if world == 1 else 1, lr=3e-3,
                                warmup_steps=1, log_interval=1, val_check_interval=3, num_val_sequences=4,
                                checkpoint_interval=0),
        evaluation=SpeculativeEvaluationConfig(num_prompts=2, prompt_tokens=16, max_new_tokens=12),
    )
    print(f"rank {os.environ.get('RANK', '0')} lossless {result.evaluation['lossless']}", flush=True)
