"""Experiment: quantization-aware distillation (QAD) of SmolLM2-135M to INT4, one NeMo-Run experiment.

    PTQ (INT4 block 32, max + GPTQ-lite; the native checkpoint is kept) -> QAD (the `distill`
    stage with that checkpoint as student and the unquantized model as teacher: the weights train
    through the fake quantizers) -> export (the `ptq` stage on the QAD checkpoint: exported in its
    own format, no recalibration) -> evaluate PTQ and QAD on held-out text -> report

    .venv/bin/python -m experiments.qad_smollm2 --yes       # run times: benchmarks/results/README.md
    .venv/bin/python -m experiments.qad_smollm2 steps=120 --dryrun --yes

Every task is a recipe with small edits; finished stages are skipped on a re-run (`run_stage`).
"""

from pathlib import Path

import nemo_run as run

from experiments.compress_smollm2 import evaluation_tasks, stage_task
from experiments.entrypoint import run_tasks
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.report import report
from nemo_optim_recipes.distill import QAD_LR, QAD_STEPS, smollm2_135m_distill_qad_int4_cpu
from nemo_optim_recipes.ptq import smollm2_135m_ptq_int4_cpu


def qad_tasks(
    model: str = SMOLLM2,
    work_dir: str = "outputs/qad_smollm2",
    steps: int = QAD_STEPS,
    lr: float = QAD_LR,
    calibration_samples: int = 64,
    eval_sequences: int = 32,
    seq_length: int = 256,
) -> dict[str, run.Partial]:
    """Task name -> task, in dependency order."""
    ptq_export, qad_export = f"{work_dir}/ptq_int4", f"{work_dir}/qad_int4_trtllm"
    quantized, distilled = f"{ptq_export}_native", f"{work_dir}/qad_int4"  # ptq saves its model beside the export

    quantize = smollm2_135m_ptq_int4_cpu()
    quantize.model_path, quantize.export_path = model, ptq_export
    quantize.quantization_config.calibration_dataset_size = calibration_samples
    quantize.quantization_config.calibration_seq_len = seq_length
    qad = smollm2_135m_distill_qad_int4_cpu()
    qad.model_path, qad.teacher_model_path, qad.output_path = quantized, model, distilled
    qad.training.max_steps, qad.training.warmup_steps = steps, max(steps // 10, 1)
    qad.training.lr, qad.training.min_lr = lr, lr / 10
    qad.data.seq_length = seq_length
    export = smollm2_135m_ptq_int4_cpu()
    export.model_path, export.export_path = distilled, qad_export

    tasks = {
        "quantize": stage_task(quantize, "quantize", ptq_export, work_dir, [model]),
        "qad": stage_task(qad, "qad", distilled, work_dir, [quantized, model]),
        "export": stage_task(export, "export", qad_export, work_dir, [distilled]),
    }
    models = {"original": model, "INT4 PTQ": quantized, "INT4 PTQ + QAD": distilled}
    # QAD trains on pydoc text only: any docstrings are held out (benchmarks/ptq.py's text)
    evaluations, evaluate_tasks = evaluation_tasks(models, model, work_dir, eval_sequences, seq_length,
                                                   source="embedded:docstrings", split="train")
    tasks |= evaluate_tasks
    tasks["report"] = run.Partial(report, output_dir=f"{work_dir}/report", models=models, evaluations=evaluations,
                                  distillation_metrics=f"{distilled}_run/metrics.jsonl",
                                  artifacts={"INT4 PTQ": ptq_export, "INT4 PTQ + QAD": qad_export},
                                  title=f"INT4 quantization-aware distillation of {Path(model).name}")
    return tasks


@run.cli.entrypoint(type="experiment", namespace="experiments")
def qad_smollm2(
    ctx: run.cli.RunContext,
    model: str = SMOLLM2,
    work_dir: str = "outputs/qad_smollm2",
    steps: int = QAD_STEPS,
    lr: float = QAD_LR,
    calibration_samples: int = 64,
    eval_sequences: int = 32,
    seq_length: int = 256,
) -> None:
    """INT4 PTQ -> QAD -> INT4 export -> evaluate -> report (qad_tasks)."""
    settings = {key: value for key, value in locals().items() if key != "ctx"}  # qad_tasks' arguments
    run_tasks(ctx, "qad_smollm2", qad_tasks(**settings), report=f"{work_dir}/report/report.md")


if __name__ == "__main__":
    run.cli.main(qad_smollm2)
