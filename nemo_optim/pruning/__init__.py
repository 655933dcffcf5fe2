"""Structured pruning (Minitron width/depth via ModelOpt, or dropping layers): `PruningConfig`,
`prune_language_model`, and the `prune` stage entry (nemo_optim.pruning.prune)."""
