"""The `distill` stage: a student learns from a frozen teacher (logit KL, optional intermediate
losses, optional LM loss), then is saved as a native checkpoint.

Steps: load student and teacher (same TP/PP; tokenizers must match), wrap them in ModelOpt's
DistillationModel, train with `nemo_optim.training` (resumable), export the student (ModelOpt
state such as quantizers is kept: a PTQ checkpoint as student gives QAD), save, optionally
export to HF.

    python -c "from nemo_optim.distillation.distill import distill; distill(student_model_path='outputs/smollm2_135m/pruned_depth20', teacher_model_path='smollm2-135m-instruct', output_path='/tmp/distilled')"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads distill's annotations.
"""

import dataclasses
from pathlib import Path
from typing import Optional

from modelopt.torch.distill.plugins.megatron import DistillationConfig

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.distillation.config import DistillationConfigError, describe, load_distillation_config
from nemo_optim.distillation.model import (
    DistillationLossReduction,
    build_distillation_model,
    export_student,
    get_tensor_shapes_adjust_fn_for_distillation,
    teacher_provider,
)
from nemo_optim.errors import one_line_input_errors, refuse_existing_outputs
from nemo_optim.models.hf import export_hf
from nemo_optim.models.loader import load_model, load_tokenizer, read_model_config
from nemo_optim.prelaunch import check_data_source
from nemo_optim.training import TrainingConfig, TrainingResult, default_run_dir, train


def chosen_distillation_config(path: Optional[str], config: Optional[DistillationConfig]) -> DistillationConfig:
    """The checked config from the YAML `path` or the code `config` (one of them, or neither
    for ModelOpt's defaults)."""
    if path and config is not None:
        raise DistillationConfigError("both distillation_config_path and distillation_config are set; keep one "
                                      "(on the CLI: distillation_config=None to use the YAML).")
    return load_distillation_config(path or config)


@one_line_input_errors
def distill(
    *,
    student_model_path: str,
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
) -> TrainingResult:
    """Stage entry (NeMo 2's `llm.distill` inputs): distill `teacher_model_path` into the
    student and save it at `output_path`.

    Args:
        student_model_path / teacher_model_path: native checkpoint, HF directory, .gguf file or
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
    parallel = runtime.ParallelConfig(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
                                      seed=training.seed)
    with runtime.parallel_runtime(parallel):
        mismatch = runtime.launched_processes_message(devices, num_nodes)
        if mismatch:
            raise DistillationConfigError(mismatch)
        student = load_model(student_model_path)
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
                           "student": str(student_model_path), "teacher": str(teacher_model_path),
                           "distillation_config": describe(kd_config), "data": dataclasses.asdict(data),
                           "tp_size": tp_size, "pp_size": pp_size})

        student_model = export_student(model)
        checkpoint.save_checkpoint(student_model, student.config, output_path, student.hf_dir, producer={
            "stage": "distill", "student": str(student_model_path), "teacher": str(teacher_model_path),
            "distillation_config": describe(kd_config), "training": dataclasses.asdict(training),
            "data": dataclasses.asdict(data), "final_validation": result.last("validation"),
            "run_dir": str(run_dir),
            # a quantized student (QAD) keeps its calibration settings: ptq exports it with them
            "quantization_config": checkpoint.stored_quantization_settings(student_model_path),
        })
        runtime.print0(f"distilled native checkpoint: {output_path} (metrics: {run_dir / 'metrics.jsonl'})")
        if hf_export_path:
            export_hf(student_model, student.hf_dir, hf_export_path, dtype=student.config.torch_dtype)
            runtime.print0(f"HF export: {hf_export_path}")
    return result


def check_distill_arguments(**arguments) -> None:
    """What can be checked before any model is loaded (launchers call it before submitting)."""
    chosen_distillation_config(arguments.get("distillation_config_path"), arguments.get("distillation_config"))
    check_data_source("data.source", arguments.get("data"), arguments.get("launch_target"))


distill.check_arguments = check_distill_arguments
