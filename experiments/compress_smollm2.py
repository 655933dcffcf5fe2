"""Experiment: the Minitron-style pipeline on SmolLM2-135M, one NeMo-Run experiment.

    prune (Minitron depth) -> correct the teacher (Minitron's teacher correction: the original
    fine-tuned on the distillation data) -> distill (logit KD + LM loss from the corrected
    teacher) -> PTQ (FP8, unified HF export) -> export (the distilled student in bf16 HF) ->
    evaluate every model -> report

    .venv/bin/python -m experiments.compress_smollm2 --yes          # run times: benchmarks/results/README.md
    .venv/bin/python -m experiments.compress_smollm2 --dryrun --yes    # prints the tasks (NeMo-Run asks first)
    .venv/bin/python -m experiments.compress_smollm2 run.executor=slurm run.executor.partition=batch \
distill_steps=60 --yes

Every task is a recipe with small edits, wrapped in `run_stage`: a stage whose output is
complete and was made from the same inputs and settings is skipped, so re-running after a crash
(or after changing only the last stages) redoes only what is stale; a killed distillation
resumes from its last training checkpoint. The report (markdown + PNG) is always rewritten.
"""

from pathlib import Path

import nemo_run as run
from modelopt.torch.distill.plugins.megatron import DistillationConfig

from experiments.entrypoint import run_tasks
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.pipeline import run_stage
from nemo_optim.report import report
from nemo_optim_recipes.convert import evaluate_recipe, export_recipe
from nemo_optim_recipes.distill import distillation_recipe
from nemo_optim_recipes.executors import EXECUTORS
from nemo_optim_recipes.finetune import finetune_recipe
from nemo_optim_recipes.launching import run_experiment
from nemo_optim_recipes.prune import prune_recipe
from nemo_optim_recipes.ptq import ptq_recipe


def stage_task(recipe: run.Partial, name: str, output: str, work_dir: str, inputs: list) -> run.Partial:
    return run.Partial(run_stage, stage=recipe, name=name, output=output, state_dir=f"{work_dir}/state", inputs=inputs)


def evaluation_tasks(models: dict[str, str], reference_model: str, work_dir: str, num_sequences: int, seq_length: int,
                     source: str | None = None,
                     split: str | None = None) -> tuple[dict[str, str], dict[str, run.Partial]]:
    """An `evaluate` task per model against `reference_model`: (label -> its JSON, task name -> task).
    `source` / `split`: other evaluation text than the recipe's (the embedded corpus's validation split)."""
    evaluations, tasks = {}, {}
    for label, path in models.items():
        key = "evaluate_" + label.replace(" + ", "_").replace(" ", "_").lower()
        evaluations[label] = f"{work_dir}/evaluations/{key}.json"
        evaluation = evaluate_recipe(model_path=path, reference_model_path=reference_model,
                                     output_path=evaluations[label], num_sequences=num_sequences, seq_length=seq_length)
        if source is not None:
            evaluation.evaluation.data.source = source
        if split is not None:
            evaluation.evaluation.split = split
        tasks[key] = stage_task(evaluation, key, evaluations[label], work_dir, [path, reference_model])
    return evaluations, tasks


def pipeline_tasks(
    model: str = SMOLLM2,
    work_dir: str = "outputs/compress_smollm2",
    target_num_layers: int = 18,
    importance_samples: int = 32,
    teacher_correction_steps: int = 30,
    teacher_correction_lr: float = 1e-4,
    distill_steps: int = 30,
    lr: float = 1e-3,
    calibration_samples: int = 16,
    eval_sequences: int = 16,
    seq_length: int = 256,
) -> dict[str, run.Partial]:
    """Task name -> task, in dependency order. Defaults: SmolLM2 at a 2-core CPU scale.
    `teacher_correction_steps=0` distills from the original model instead of a corrected one."""
    pruned, distilled = f"{work_dir}/pruned", f"{work_dir}/distilled"
    teacher = f"{work_dir}/teacher_corrected" if teacher_correction_steps else model
    quantized_hf, student_hf = f"{work_dir}/quantized_fp8_hf", f"{work_dir}/distilled_hf"
    quantized = f"{quantized_hf}_native"  # ptq saves the calibrated model beside its export

    prune = prune_recipe(model_path=model, output_path=pruned, target_num_layers=target_num_layers,
                         num_train_samples=importance_samples, seq_length=seq_length)
    correct_teacher = finetune_recipe(model_path=model, dir=work_dir, name="teacher_corrected",
                                      max_steps=teacher_correction_steps, seq_length=seq_length,
                                      lr=teacher_correction_lr, min_lr=teacher_correction_lr / 10,
                                      warmup_steps=max(teacher_correction_steps // 10, 1))
    distill = distillation_recipe(model_path=pruned, teacher_model_path=teacher, dir=work_dir, name="distilled",
                                  max_steps=distill_steps, global_batch_size=4, micro_batch_size=2,
                                  seq_length=seq_length, lr=lr, min_lr=lr / 10,
                                  warmup_steps=max(distill_steps // 10, 1))
    # the LM loss beside the logit KL (ModelOpt's balancer), KL at temperature 2:
    # benchmarks/results/distill.md (10.4% below CE's perplexity, mean of 4 seeds)
    distill.distillation_config = run.Config(DistillationConfig, skip_lm_loss=False, logit_kl_temperature=2.0)
    quantize = ptq_recipe(model_path=distilled, export_path=quantized_hf, algorithm="fp8", model_dtype="float32",
                          calibration_dataset_size=calibration_samples, calibration_seq_len=seq_length)
    export = export_recipe(model_path=distilled, output_path=student_hf)
    tasks = {"prune": stage_task(prune, "prune", pruned, work_dir, [model])}
    if teacher_correction_steps:
        tasks["correct_teacher"] = stage_task(correct_teacher, "correct_teacher", teacher, work_dir, [model])
    tasks |= {
        "distill": stage_task(distill, "distill", distilled, work_dir, [pruned, teacher]),
        "quantize": stage_task(quantize, "quantize", quantized_hf, work_dir, [distilled]),
        "export": stage_task(export, "export", student_hf, work_dir, [distilled]),
    }
    models = {"original": model, **({"teacher corrected": teacher} if teacher_correction_steps else {}),
              "pruned": pruned, "distilled": distilled, "distilled + FP8": quantized}
    evaluations, evaluate_tasks = evaluation_tasks(models, model, work_dir, eval_sequences, seq_length)
    tasks |= evaluate_tasks
    tasks["report"] = run.Partial(report, output_dir=f"{work_dir}/report", models=models, evaluations=evaluations,
                                  distillation_metrics=f"{distilled}_run/metrics.jsonl",
                                  artifacts={"distilled": student_hf, "distilled + FP8": quantized_hf},
                                  title=f"Compression of {Path(model).name}: prune -> "
                                  + ("correct teacher -> " if teacher_correction_steps else "") + "distill -> FP8")
    return tasks


def run_pipeline(tasks: dict[str, run.Partial], executor: str = "local", dryrun: bool = False,
                 name: str = "compress_smollm2") -> int:
    """One experiment, tasks in order; returns a process exit code (non-zero if a task failed)."""
    return run_experiment(name, tasks, EXECUTORS[executor](), dryrun=dryrun)


@run.cli.entrypoint(type="experiment", namespace="experiments")
def compress_smollm2(
    ctx: run.cli.RunContext,
    model: str = SMOLLM2,
    work_dir: str = "outputs/compress_smollm2",
    target_num_layers: int = 18,
    importance_samples: int = 32,
    teacher_correction_steps: int = 30,
    teacher_correction_lr: float = 1e-4,
    distill_steps: int = 30,
    lr: float = 1e-3,
    calibration_samples: int = 16,
    eval_sequences: int = 16,
    seq_length: int = 256,
) -> None:
    """prune -> correct the teacher -> distill -> FP8 PTQ -> export -> evaluate -> report (pipeline_tasks)."""
    settings = {key: value for key, value in locals().items() if key != "ctx"}  # pipeline_tasks' arguments
    run_tasks(ctx, "compress_smollm2", pipeline_tasks(**settings), report=f"{work_dir}/report/report.md")


if __name__ == "__main__":
    run.cli.main(compress_smollm2)
