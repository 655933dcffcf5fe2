"""The `speculative` stage: add draft heads (EAGLE-3, EAGLE-1 or Medusa, through ModelOpt's
`mtsp.convert`) to a frozen base model, train them, measure lossless speculative decoding on
held-out prompts, save them, and export them for serving engines.

Steps:
  1. the base model as a transformers model (native checkpoints are exported to HF once),
  2. training rows: the data source's text, or the base model's own greedy continuations of
     prompts (`self_distillation.num_prompts > 0`),
  3. ModelOpt conversion; only the draft's parameters train (the project's training loop:
     resumable checkpoints, metrics.jsonl, TensorBoard),
  4. measurement: speculative vs plain KV-cached greedy decoding of held-out prompts
     (identical outputs, acceptance length, tokens/s) at each draft length,
  5. the speculative checkpoint at `output_path` (draft weights, ModelOpt state, results),
  6. the deployment export at `export_path` (EAGLE: ModelOpt's exporter; Medusa: vLLM layout).

    python -c "from nemo_optim.stages.speculative import speculative; \
speculative(model_path='smollm2-135m-instruct', output_path='/tmp/eagle3')"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from nemo_optim import runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.models.forward import run_micro_batches
from nemo_optim.models.loader import load_tokenizer
from nemo_optim.speculative import model as draft_model
from nemo_optim.speculative.config import SpeculativeConfig, SpeculativeConfigError
from nemo_optim.speculative.data import SelfDistillationConfig, document_prompts, training_rows
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig, measure_draft
from nemo_optim.stage import refuse_existing_outputs, stage_entry, stage_runtime
from nemo_optim.training import TrainingConfig, TrainingResult, default_run_dir, train


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}


@dataclasses.dataclass
class SpeculativeResult:
    output_path: str
    training: TrainingResult
    evaluation: dict
    """`SpeculativeEvaluation.to_dict()`: per draft length, acceptance length and tokens/s."""
    export_path: Optional[str] = None


def check_arguments(*, model_path: str, output_path: str, speculative_config: Optional[SpeculativeConfig] = None,
                    evaluation: Optional[SpeculativeEvaluationConfig] = None, export_path: Optional[str] = None,
                    dtype: Optional[str] = None, overwrite: bool = False, **_ignored) -> None:
    """What can be refused before a model is loaded (also run before a job is submitted)."""
    config = speculative_config or SpeculativeConfig()
    if dtype not in DTYPES:
        raise SpeculativeConfigError(f"dtype={dtype!r}: choose float32, bfloat16 or None (the device's default).")
    refuse_existing_outputs([("output_path", output_path), ("export_path", export_path)], overwrite)
    if draft_model.is_speculative_checkpoint(model_path):
        raise SpeculativeConfigError(
            f"model_path={model_path!r} is a speculative checkpoint: the base model already has draft heads; "
            f"give the model without them.")
    lengths = (evaluation.draft_lengths if evaluation else None) or [config.num_draft_tokens]
    if config.algorithm == "medusa" and max(lengths) > config.medusa_heads:
        raise SpeculativeConfigError(
            f"evaluation.draft_lengths={lengths} needs {max(lengths)} Medusa heads; set "
            f"speculative_config.num_medusa_heads to at least {max(lengths)}.")


@stage_entry(check_arguments)
def speculative(
    *,
    model_path: str,
    output_path: str,
    speculative_config: Optional[SpeculativeConfig] = None,
    data: Optional[DataConfig] = None,
    self_distillation: Optional[SelfDistillationConfig] = None,
    training: Optional[TrainingConfig] = None,
    evaluation: Optional[SpeculativeEvaluationConfig] = None,
    export_path: Optional[str] = None,
    run_dir: Optional[str] = None,
    resume: bool = True,
    dtype: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    overwrite: bool = False,
) -> SpeculativeResult:
    """Stage entry: train draft heads for the model at `model_path` (module docstring).

    Args:
        model_path: native checkpoint, HF directory, .gguf file or embedded model name.
        output_path: the speculative checkpoint (draft weights, ModelOpt state, evaluation.json).
        speculative_config: algorithm, draft length, draft size.
        data: training text and the validation split the held-out prompts come from.
        self_distillation: train on the base model's own greedy continuations instead.
        training: steps, batch sizes, optimizer; validation reports the draft loss.
        evaluation: held-out prompts, tokens to generate, draft lengths to measure.
        export_path: also write the draft for serving engines here.
        run_dir: training checkpoints + metrics (default: `<output_path>_run`).
        dtype: float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU).
        devices / num_nodes: processes per node and nodes this job was launched with; each
            process trains on its share of every global batch (data parallel).
    """
    speculative_config = speculative_config or SpeculativeConfig()
    data = data or DataConfig()
    self_distillation = self_distillation or SelfDistillationConfig()
    training = training or TrainingConfig()
    evaluation = evaluation or SpeculativeEvaluationConfig()
    check_arguments(model_path=model_path, output_path=output_path, speculative_config=speculative_config,
                    evaluation=evaluation, export_path=export_path, dtype=dtype, overwrite=overwrite)
    run_dir = Path(run_dir) if run_dir else default_run_dir(output_path)
    base_hf_dir = draft_model.base_hf_directory(model_path)
    # every process holds the whole model; more processes (torchrun) are data parallel
    with stage_runtime(devices=devices, num_nodes=num_nodes, seed=training.seed):
        base = draft_model.load_base(base_hf_dir, DTYPES[dtype])
        tokenizer = load_tokenizer(base_hf_dir)
        train_rows = training_rows(base, base_hf_dir, data, tokenizer, self_distillation)
        val_rows = packed_sequences(data, "validation", tokenizer, training.num_val_sequences)
        model = draft_model.add_draft_heads(base, speculative_config)
        if speculative_config.draft_vocab_size:
            draft_model.set_draft_vocabulary(model, train_rows)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runtime.print0(f"training {speculative_config.algorithm} draft: {trainable / 1e6:.2f} M parameters on "
                       f"{len(train_rows)} rows of {data.seq_length} tokens")
        result = train(model, train_rows, val_rows, draft_model.draft_loss, training, run_dir, resume=resume,
                       forward_backward=run_micro_batches,
                       fingerprint={"model": str(model_path), "speculative": dataclasses.asdict(speculative_config),
                                    "data": dataclasses.asdict(data),
                                    "self_distillation": dataclasses.asdict(self_distillation)})
        measured = None
        if runtime.is_main_process():  # batch-1 decoding: one process measures, saves and exports
            prompts = document_prompts(data, "validation", tokenizer, evaluation.num_prompts, evaluation.prompt_tokens)
            measured = measure_draft(model, prompts, evaluation.draft_lengths or [speculative_config.num_draft_tokens],
                                     evaluation.max_new_tokens, tokenizer.eos_token_id).to_dict()
            speculative_model = draft_model.SpeculativeModel(model, speculative_config, base_hf_dir)
            draft_model.save_speculative_checkpoint(speculative_model, output_path, model_path, evaluation=measured,
                                                    producer={
                "stage": "speculative", "training": dataclasses.asdict(training), "data": dataclasses.asdict(data),
                "self_distillation": dataclasses.asdict(self_distillation),
                "final_validation": result.last("validation"), "run_dir": str(run_dir)})
            print(f"speculative checkpoint: {output_path}", flush=True)
            if export_path:
                draft_model.export_draft(speculative_model, export_path)
                print(f"draft export ({'EAGLE' if speculative_config.is_eagle else 'Medusa'} format): {export_path}",
                      flush=True)
            print(json.dumps(measured["results"], indent=2), flush=True)
        measured = runtime.broadcast_object(measured)
    return SpeculativeResult(output_path=str(output_path), training=result, evaluation=measured,
                             export_path=str(export_path) if export_path else None)
