"""Run with nemo_toolkit 2.x (`make nemo2-venv`): NeMo 2 reads a NeMo 2 checkpoint directory the way
its own loaders do and computes logits, to check a checkpoint nemo-optim wrote.

    .venv-nemo2/bin/python tests/nemo2/forward_checkpoint.py CHECKPOINT_DIR TOKENS.pt OUTPUT.pt

Config: `nemo.lightning.io.load_context(<ckpt>/context, subpath="model")` (io.json, built by fiddle;
the tokenizer from its context/nemo_tokenizer artifact). Model: NeMo's `config.configure_model`.
Weights: NeMo's `MegatronCheckpointIO.load_checkpoint` with the `module.`-keyed sharded state dict
that NeMo's MegatronStrategy builds, then `load_state_dict` (every weight present). On a CPU, the
redirections of write_checkpoint.py, and the loaded tensors are left on the CPU (NeMo moves them to
the CUDA device) and the forward's device="cuda" tensors made on the CPU; Lightning's Trainer/Fabric
are not used (they need a GPU).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_checkpoint import run_nemo_on_cpu  # noqa: E402


def main() -> int:
    checkpoint, tokens_path, output = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    run_nemo_on_cpu()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    from nemo.lightning import io
    from nemo.lightning.io import pl
    from nemo.lightning.io.pl import MegatronCheckpointIO

    pl._fix_tensors_device = lambda checkpoint: checkpoint  # it moves loaded tensors onto the CUDA device

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    initialize_rng_tracker(inference_rng_tracker=True)

    model = io.load_context(checkpoint / "context", subpath="model")
    model.config.use_cpu_initialization = True
    module = model.config.configure_model(model.tokenizer)
    sharded = {"state_dict": module.sharded_state_dict(prefix="module.")}
    loaded = MegatronCheckpointIO(save_ckpt_format="torch_dist").load_checkpoint(checkpoint / "weights",
                                                                                 sharded_state_dict=sharded)
    state_dict = {key.removeprefix("module."): value for key, value in loaded["state_dict"].items()}
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)

    class CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
        """megatron's attention mask is made with device="cuda"."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad(), CudaDeviceToCpu():
        logits = module.eval()(tokens, positions, None)
    text = "The return value is an integer."
    torch.save({"logits": logits.float(), "tokenizer_ids": model.tokenizer.text_to_ids(text),
                "model_class": type(model).__name__, "config_class": type(model.config).__name__}, output)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
