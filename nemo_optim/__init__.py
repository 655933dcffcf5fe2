"""nemo-optim: LLM compression (PTQ, Minitron pruning, distillation, speculative decoding,
export) on megatron-core and NVIDIA ModelOpt. Stage entry points live in the submodules; this
package imports nothing heavy at import time."""

import warnings

__version__ = "0.1.0"

# megatron-core warns from six modules that Transformer Engine / Apex are missing before any
# output of ours. nemo-optim's CPU path never needs them, and the GPU paths that do
# (transformer_impl=transformer_engine / modelopt) fail with their own error when they are absent.
for _message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
