"""The `distill` stage: a student learns from a frozen teacher (logit KL, optional intermediate
losses, optional LM loss), then is saved as a native checkpoint.

Steps: load student and teacher (same TP/PP; tokenizers must match), wrap them in ModelOpt's
DistillationModel, train with `nemo_optim.training` (resumable), export the student (ModelOpt
state such as quantizers is kept: a PTQ checkpoint as student gives QAD), save, optionally
export to HF.

    python -c "from nemo_optim.stages.distill import distill; \
distill(model_path='outputs/smollm2_135m/pruned_depth20', teacher_model_path='smollm2-135m-instruct', \
output_path='/tmp/distilled')"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads distill's annotations.
"""

import dataclasses
from pathlib import Path
from typing import Optional

from modelopt.torch.distill.plugins.megatron import DistillationConfig

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.distillation.config import chosen_distillation_config, describe
from nemo_optim.distillation.model import (
    DistillationLossReduction,
    build_distillation_model,
    export_student,
    get_tensor_shapes_adjust_fn_for_distillation,
    teacher_provider,
)
from nemo_optim.models.loader import load_model, load_tokenizer, read_model_config
from nemo_optim.prelaunch import LaunchTarget, check_data_source
from nemo_optim.stage import refuse_existing_outputs, save_stage_model, stage_entry, stage_runtime
from nemo_optim.training import TrainingConfig, TrainingResult, default_run_dir, train


def check_arguments(*, distillation_config_path: Optional[str] = None,
                    distillation_config: Optional[DistillationConfig] = None, data: Optional[DataConfig] = None,
                    launch_target: Optional[LaunchTarget] = None, **_) -> None:
    """Pre-launch (and at the start): one distillation config that loads, and a training text
    file that is missing or malformed."""
    chosen_distillation_config(distillation_config_path, distillation_config)
    check_data_source("data.source", data, launch_target)


@stage_entry(check_arguments)
def distill(
    *,
    model_path: str,
    teacher_model_path: str,
    output_path: str,
    distillation_config_path: Optional[str] = None,
    distillation_config: Optional[DistillationConfig] = None,
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
    student_model_path: Optional[str] = None,
) -> TrainingResult:
    """Stage entry (NeMo 2's `llm.distill` inputs): distill `teacher_model_path` into the
    student and save it at `output_path`.

    Args:
        model_path / teacher_model_path: native checkpoint, HF directory, .gguf file or
            embedded model name. A quantized native checkpoint as student trains its fake-quant
            weights (QAD).
        distillation_config_path: ModelOpt DistillationConfig YAML (default: logits-only KD).
        distillation_config: the same in code (not together with the path).
        data: training / validation text (default: the embedded corpus).
        training: steps, batch sizes, optimizer, validation and checkpoint intervals.
        run_dir: training checkpoints + metrics.jsonl + TensorBoard (default: `<output_path>_run`).
        resume: continue from the newest complete checkpoint in run_dir.
        tokenizer_path: tokenizer shared by both models (default: the student's).
        devices / num_nodes: processes per node and nodes this job was launched with.
        tp_size / pp_size: tensor / pipeline parallelism of student and teacher.
        hf_export_path: also export the distilled student to HF here.
    """
    data = data or DataConfig()
    training = training or TrainingConfig()
    kd_config = chosen_distillation_config(distillation_config_path, distillation_config)
    refuse_existing_outputs([("output_path", output_path), ("hf_export_path", hf_export_path)], overwrite)
    run_dir = Path(run_dir) if run_dir else default_run_dir(output_path)
    with stage_runtime(tp_size, pp_size, devices, num_nodes, seed=training.seed):
        student = load_model(model_path)
        tokenizer = load_tokenizer(tokenizer_path or student.hf_dir)
        teacher_config, _, _ = read_model_config(teacher_model_path)
        teacher = teacher_provider(None, teacher_model_path, tokenizer=tokenizer)
        model = build_distillation_model(student.model, teacher, kd_config, student.config, teacher_config)
        runtime.print0(f"distilling {teacher_config.num_parameters() / 1e6:.1f} M -> "
                       f"{student.config.num_parameters() / 1e6:.1f} M parameters: {describe(kd_config)}")

        train_tokens = packed_sequences(data, "train", tokenizer)
        val_tokens = packed_sequences(data, "validation", tokenizer, training.num_val_sequences)
        adjust_fn = get_tensor_shapes_adjust_fn_for_distillation(
            model, seq_length=data.seq_length, micro_batch_size=training.micro_batch_size)
        result = train(model, train_tokens, val_tokens, DistillationLossReduction(model, kd_config), training,
                       run_dir, resume=resume, adjust_tensor_shapes_fn=adjust_fn, fingerprint={
                           "student": str(model_path), "teacher": str(teacher_model_path),
                           "distillation_config": describe(kd_config), "data": dataclasses.asdict(data)})

        student_model = export_student(model)
        save_stage_model(student_model, student.config, output_path, student.hf_dir, hf_export_path, producer={
            "stage": "distill", "student": str(model_path), "teacher": str(teacher_model_path),
            "distillation_config": describe(kd_config), "training": dataclasses.asdict(training),
            "data": dataclasses.asdict(data), "final_validation": result.last("validation"),
            "run_dir": str(run_dir),
            # a quantized student (QAD) keeps its calibration settings: ptq exports it with them
            "quantization_config": checkpoint.stored_quantization_settings(model_path),
        })
        runtime.print0(f"training metrics: {run_dir / 'metrics.jsonl'}")
    return result
