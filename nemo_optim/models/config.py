"""A typed Llama-style GPT config and the megatron-core `GPTModel` it builds."""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these config
# dataclasses' annotations as real types (and needs Optional[...] rather than `X | None`).

import dataclasses
import json
from pathlib import Path
from typing import Optional, Any, Literal

import torch

from nemo_optim import runtime
from nemo_optim.errors import InputError

Normalization = Literal["RMSNorm", "LayerNorm"]
TransformerImpl = Literal["local", "modelopt", "transformer_engine"]
DType = Literal["float32", "bfloat16", "float16"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclasses.dataclass
class GPTModelConfig:
    """Shape and numerics of a decoder-only Llama-style model (Llama, Qwen2, Qwen3, SmolLM2)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    num_query_groups: Optional[int] = None
    """Key/value heads (GQA); None means one per attention head."""
    kv_channels: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    normalization: Normalization = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1 style RoPE scaling factor; None disables scaling."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    add_qkv_bias: bool = False
    """Qwen2 has biases on the q/k/v projections."""
    qk_layernorm: bool = False
    """Qwen3 normalises queries and keys per head."""
    dtype: DType = "float32"
    """Parameter dtype; bf16 is the GPU choice, fp32 the CPU one."""
    transformer_impl: TransformerImpl = "local"
    """Layer spec: `local` (pure megatron-core, runs on CPU), `modelopt` (megatron's ModelOpt
    spec: local layers with Transformer Engine norms), `transformer_engine` (TE fused layers)."""
    hf_architecture: str = "LlamaForCausalLM"
    """The HF architecture this model imports from and exports to."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                errors.append(f"{name}={value!r} must be a positive integer")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_query_groups < 1 or self.num_attention_heads % self.num_query_groups:
            errors.append(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads == 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.kv_channels is None:
            errors.append(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set kv_channels explicitly"
            )
        if self.dtype not in DTYPES:
            errors.append(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            errors.append(f"normalization={self.normalization!r}: choose RMSNorm or LayerNorm")
        if self.transformer_impl not in ("local", "modelopt", "transformer_engine"):
            errors.append(
                f"transformer_impl={self.transformer_impl!r}: choose local, modelopt or transformer_engine"
            )
        if errors:
            raise InputError("GPTModelConfig: " + "; ".join(errors) + ".")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GPTModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"GPTModelConfig: unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def num_parameters(self) -> int:
        """Parameter count from the shapes (embeddings counted once when tied)."""
        heads_dim = self.num_attention_heads * self.kv_channels
        kv_dim = self.num_query_groups * self.kv_channels
        attention = self.hidden_size * (heads_dim + 2 * kv_dim) + heads_dim * self.hidden_size
        if self.add_qkv_bias:
            attention += heads_dim + 2 * kv_dim
        if self.qk_layernorm:
            attention += 2 * self.kv_channels
        mlp = 3 * self.hidden_size * self.ffn_hidden_size  # gated: gate, up, down
        norm_size = self.hidden_size * (2 if self.normalization == "LayerNorm" else 1)
        per_layer = attention + mlp + 2 * norm_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + norm_size


def transformer_config(config: GPTModelConfig, parallel: Optional[runtime.ParallelConfig] = None):
    """The megatron `TransformerConfig` for `config` (fusions off on CPU, they need CUDA kernels)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel = parallel or runtime.ParallelConfig()
    on_gpu = runtime.use_cuda()
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups,
        kv_channels=config.kv_channels,
        normalization=config.normalization,
        layernorm_epsilon=config.layernorm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=config.torch_dtype,
        bf16=config.dtype == "bfloat16",
        fp16=config.dtype == "float16",
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        pipeline_dtype=config.torch_dtype,
        sequence_parallel=False,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=False,
    )


def _layer_spec(config: GPTModelConfig, mcore_config):
    from megatron.core.models.gpt import gpt_layer_specs

    if config.transformer_impl == "local":
        from nemo_optim.models.attention import SDPADotProductAttention

        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=config.qk_layernorm, normalization=config.normalization
        )
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
        return spec
    if config.transformer_impl == "modelopt":
        from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

        return get_gpt_modelopt_spec(mcore_config, remap_te_layernorm=False)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)


_INIT_METHODS = ("init_method", "output_layer_init_method", "embedding_init_method")


def _zeros_instead_of_random(tensor: torch.Tensor) -> None:
    # not left uninitialised: restoring a quantized checkpoint's ModelOpt state reads the weights
    # (weight amax) before they are loaded, and garbage memory can hold NaNs
    with torch.no_grad():  # megatron's device path hands over the Parameter itself
        tensor.zero_()


def build_gpt_model(config: GPTModelConfig, parallel: Optional[runtime.ParallelConfig] = None,
                    initialize: bool = True):
    """Builds this process's part of a megatron-core `GPTModel` (needs `runtime.parallel_runtime`).

    `initialize=False` fills zeros instead of random values, for a caller that loads every weight next
    (on CPU megatron's normal_ init was most of a load's time). The init functions are
    swapped for zero fills rather than setting megatron's `perform_initialization=False`: megatron
    sets a weight's tensor-parallel attributes only inside its init step, and TP training needs them.
    The fills take megatron's device path (the CPU here): its CPU path builds a full-size master copy
    of every weight and copies it over (timings: benchmarks/results/README.md, PTQ against ModelOpt's HF path)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    parallel = parallel or runtime.ParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if config.vocab_size % parallel.tensor_model_parallel_size:
        raise InputError(
            f"vocab_size={config.vocab_size} must be divisible by tensor_model_parallel_size="
            f"{parallel.tensor_model_parallel_size}."
        )
    mcore_config = transformer_config(config, parallel)
    init_methods = {name: getattr(mcore_config, name) for name in _INIT_METHODS}
    if not initialize:
        for name in init_methods:
            setattr(mcore_config, name, _zeros_instead_of_random)
        mcore_config.use_cpu_initialization = False  # zeros need no RNG shared across TP ranks
    model = GPTModel(
        config=mcore_config,
        transformer_layer_spec=_layer_spec(config, mcore_config),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rotary_base),
        rope_scaling=config.rope_scaling_factor is not None,
        rope_scaling_factor=config.rope_scaling_factor or 8.0,
        # vocab-parallel logits: what megatron's cross-entropy and ModelOpt's KD losses expect
        parallel_output=True,
    )
    # modules built later from this config (ModelOpt's EAGLE / Medusa heads) initialise as usual
    for name, method in init_methods.items():
        setattr(mcore_config, name, method)
    mcore_config.use_cpu_initialization = not runtime.use_cuda()
    return model.to(device=runtime.device(), dtype=config.torch_dtype)
