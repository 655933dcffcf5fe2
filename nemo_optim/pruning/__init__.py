"""Structured pruning (Minitron width/depth via ModelOpt, or dropping layers): `PruningConfig`
(config.py) and `prune_language_model` (pruner.py). The `prune` stage: nemo_optim.stages.prune."""
