"""Knowledge distillation on ModelOpt's megatron plugin (`modelopt.torch.distill.plugins.megatron`)."""
