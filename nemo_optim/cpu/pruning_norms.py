"""ModelOpt's Minitron pruning on the norms megatron's local spec builds without Apex or Transformer
Engine (torch's `nn.RMSNorm` / `nn.LayerNorm`: what a CPU run gets). Called by the pruner before
it converts a local-spec model.
"""

from __future__ import annotations

import torch

_cpu_norms_registered = False


def register_cpu_norms_for_pruning() -> None:
    """Lets ModelOpt's Minitron pruning shrink the norms of megatron's local spec.

    On CPU megatron builds torch's `nn.RMSNorm` / `nn.LayerNorm` (no Apex/TE). ModelOpt's
    megatron plugin converts each norm with a shared `num_features` hyperparameter (the hidden
    size), which only its Fused/TE norm classes accept. Registers both torch norms with a dynamic
    class that does; applied once per process. (ModelOpt's own `nn.LayerNorm` entry, which owns
    its hyperparameter, is replaced while this process prunes megatron models.)
    """
    global _cpu_norms_registered
    if _cpu_norms_registered:
        return
    from modelopt.torch.nas.registry import DMRegistry

    from nemo_optim import compat

    class _DynamicTorchNorm(compat.dynamic_layer_norm_class()):
        """torch LayerNorm/RMSNorm whose width is the model's shared hidden-size hyperparameter."""

        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            for attribute in ("weight", "bias"):
                if getattr(self, attribute, None) is not None:
                    self._register_dynamic_attribute(attribute, self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    for norm in (torch.nn.LayerNorm, torch.nn.RMSNorm):
        if norm in DMRegistry:
            DMRegistry.unregister(norm)
        DMRegistry.register({norm: f"torch.nn.{norm.__name__}"})(_DynamicTorchNorm)
    _cpu_norms_registered = True
