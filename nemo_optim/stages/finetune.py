"""The `finetune` stage: plain next-token cross-entropy training of one model, saved as a native
checkpoint. Its main use here is Minitron's *teacher correction*: fine-tune the teacher on the
distillation data before distilling, so the student does not learn the teacher's mismatch
with that data (SmolLM2-135M on the embedded corpus: teacher perplexity 20.4 -> 12.8 after 60
steps, benchmarks/results/distill.md).

    python -c "from nemo_optim.stages.finetune import finetune; \
finetune(model_path='smollm2-135m-instruct', output_path='/tmp/teacher_corrected')"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads finetune's annotations.
"""

import dataclasses
from pathlib import Path
from typing import Optional

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.prelaunch import LaunchTarget, check_data_source
from nemo_optim.stage import refuse_existing_outputs, save_stage_model, stage_entry, stage_runtime
from nemo_optim.training import TrainingConfig, TrainingResult, default_run_dir, lm_loss_reduction, train


def check_arguments(*, data: Optional[DataConfig] = None, launch_target: Optional[LaunchTarget] = None, **_) -> None:
    """Pre-launch: a training text file that is missing or malformed (the stage reads it itself)."""
    check_data_source("data.source", data, launch_target)


@stage_entry(check_arguments)
def finetune(
    *,
    model_path: str,
    output_path: str,
    data: Optional[DataConfig] = None,
    training: Optional[TrainingConfig] = None,
    run_dir: Optional[str] = None,
    resume: bool = True,
    tokenizer_path: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    hf_export_path: Optional[str] = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Stage entry: fine-tune `model_path` with the LM loss and save it at `output_path`.

    Args:
        model_path: native checkpoint, HF directory, .gguf file or embedded model name.
        data: training / validation text (default: the embedded corpus).
        training: steps, batch sizes, optimizer, validation and checkpoint intervals.
        run_dir: training checkpoints + metrics.jsonl + TensorBoard (default: `<output_path>_run`).
        resume: continue from the newest complete checkpoint in run_dir.
        tokenizer_path: default: the model's own tokenizer.
        devices / num_nodes: processes per node and nodes this job was launched with.
        tp_size / pp_size: tensor / pipeline parallelism.
        hf_export_path: also export the fine-tuned model to HF here.
    """
    data = data or DataConfig()
    training = training or TrainingConfig()
    refuse_existing_outputs([("output_path", output_path), ("hf_export_path", hf_export_path)], overwrite)
    run_dir = Path(run_dir) if run_dir else default_run_dir(output_path)
    with stage_runtime(tp_size, pp_size, devices, num_nodes, seed=training.seed):
        loaded = load_model(model_path)
        tokenizer = load_tokenizer(tokenizer_path or loaded.hf_dir)
        runtime.print0(f"fine-tuning {loaded.config.num_parameters() / 1e6:.1f} M parameters with the LM loss")
        result = train(loaded.model, packed_sequences(data, "train", tokenizer),
                       packed_sequences(data, "validation", tokenizer, training.num_val_sequences),
                       lm_loss_reduction, training, run_dir, resume=resume,
                       fingerprint={"model": str(model_path), "data": dataclasses.asdict(data)})
        save_stage_model(loaded.model, loaded.config, output_path, loaded.hf_dir, hf_export_path, producer={
            "stage": "finetune", "model": str(model_path), "training": dataclasses.asdict(training),
            "data": dataclasses.asdict(data), "final_validation": result.last("validation"), "run_dir": str(run_dir),
            # a quantized model (QAT) keeps its calibration settings: ptq exports it with them
            "quantization_config": checkpoint.stored_quantization_settings(model_path),
        })
        runtime.print0(f"training metrics: {run_dir / 'metrics.jsonl'}")
    return result
