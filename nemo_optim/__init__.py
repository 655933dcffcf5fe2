"""nemo-optim: LLM compression (PTQ, Minitron pruning, distillation, export) on megatron-core
and NVIDIA ModelOpt. Stage entry points live in the submodules; this package imports nothing
heavy at import time."""

__version__ = "0.1.0"
