"""Pruning quality on SmolLM2-135M-Instruct (fp32, CPU), no retraining.

Rows: depth 30 -> 20 by Minitron importance vs dropping the last 10 layers vs dropping layers
18-27; width at two budgets (~78% and ~62% of the parameters). Each: parameters, held-out
perplexity and KL / top-1 agreement to the unpruned model, seconds. Importance is estimated once
into a scores cache; the second width row reuses it (the re-prune time is reported).

    .venv/bin/python -m benchmarks.prune
Writes benchmarks/results/prune.json and prune.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.common import results_arguments, write_results
from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.evaluation import evaluate_model
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.pruning.config import PruningConfig
from nemo_optim.pruning.pruner import prune_language_model

MODEL = SMOLLM2
ROWS = {
    "depth 20, Minitron importance": PruningConfig(target_num_layers=20),
    "depth 20, drop last 10 layers": PruningConfig(drop_layers=list(range(21, 31))),
    "depth 20, drop layers 18-27": PruningConfig(drop_layers=list(range(18, 28))),
    "width 78% (hidden 512, ffn 1152)": PruningConfig(target_hidden_size=512, target_ffn_hidden_size=1152),
    "width 62% (hidden 448, ffn 1024)": PruningConfig(target_hidden_size=448, target_ffn_hidden_size=1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=256)
    results_arguments(parser)
    args = parser.parse_args()
    rows = []
    scores_dir = tempfile.mkdtemp(prefix="prune-scores-")
    with runtime.parallel_runtime():
        base = load_model(MODEL)
        tokenizer = load_tokenizer(base.hf_dir)
        held_out = packed_sequences(DataConfig(source="embedded", seq_length=args.seq_length), "validation",
                                    tokenizer, args.eval_sequences)
        calibration = packed_sequences(DataConfig(source="embedded", seq_length=args.seq_length), "calibration",
                                       tokenizer, args.calib_sequences).split(4)

        def forward_loop(model):
            for batch in calibration:
                forward_logits(model, batch)

        reference = evaluate_model(base.model, held_out)
        rows.append({"row": "unpruned", "params_m": base.config.num_parameters() / 1e6,
                     "perplexity": reference.perplexity, "loss": reference.loss})
        for name, config in ROWS.items():
            loaded = load_model(MODEL)
            began = time.perf_counter()
            cache = f"{scores_dir}/{'depth' if config.target_num_layers else 'width'}"
            model, pruned_config = prune_language_model(loaded.model, loaded.config, config, forward_loop, cache)
            seconds = time.perf_counter() - began
            result = evaluate_model(model, held_out, reference=base.model)
            rows.append({"row": name, "params_m": pruned_config.num_parameters() / 1e6,
                         "params_share": pruned_config.num_parameters() / base.config.num_parameters(),
                         "perplexity": result.perplexity, "loss": result.loss, "kl": result.kl_to_reference,
                         "top1_agreement": result.top1_agreement, "prune_seconds": seconds})
            print(rows[-1], flush=True)
    notes = (f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32: its decoder weights already carry 4-bit "
             f"rounding) on CPU, no retraining. Importance on {args.calib_sequences} x "
             f"{args.seq_length} calibration tokens of the embedded corpus; evaluated on {args.eval_sequences} x "
             f"{args.seq_length} validation tokens. Width importance is estimated by the 78% row and cached; "
             f"the 62% row reuses the cache (its seconds are the re-prune time).")
    write_results("prune", rows, [
        ("row", "pruning"), ("params_m", "params (M)"), ("params_share", "share"), ("perplexity", "ppl"),
        ("loss", "loss"), ("kl", "KL"), ("top1_agreement", "top-1"), ("prune_seconds", "seconds"),
    ], f"{notes} {args.note}".strip(), args.out)


if __name__ == "__main__":
    main()
