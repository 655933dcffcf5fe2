"""Run with nemo_toolkit 2.x (`make nemo2-venv`), not with nemo-optim's environment: NeMo 2's own
`llm.import_ckpt` turns an HF Llama directory into a NeMo 2 checkpoint directory.

    .venv-nemo2/bin/python tests/nemo2/write_checkpoint.py HF_DIR OUTPUT_DIR

NeMo 2 expects a GPU; on a CPU three things are switched off or redirected, none of which
changes the weights: its configs' fused kernels (they need Transformer Engine / Apex), and the
CUDA synchronize / current-device / stream calls of its checkpoint saver and parallel set-up.
NeMo 2.7.3 without Transformer Engine does not carry HF norm weights over (its mapping names TE's
fused-norm parameters), so the tests give it a model whose norm weights are ones.
"""

import contextlib
import sys


def run_nemo_on_cpu() -> None:
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = TransformerConfig.__post_init__

    def post_init(self):
        for flag in ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm",
                     "gradient_accumulation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion"):
            if hasattr(self, flag):
                setattr(self, flag, False)
        original(self)

    TransformerConfig.__post_init__ = post_init
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def main() -> int:
    hf_dir, output = sys.argv[1], sys.argv[2]
    run_nemo_on_cpu()
    from nemo.collections import llm

    # the config given here is replaced by the one NeMo's HF importer reads from HF_DIR
    llm.import_ckpt(model=llm.LlamaModel(llm.Llama32Config1B()), source=f"hf://{hf_dir}", output_path=output,
                    overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
