"""The `evaluate` stage: perplexity, KL divergence and top-1 agreement against a reference
model, tokens/second, multiple-choice task accuracy and lm-evaluation-harness tasks
(nemo_optim.evaluation), written as JSON.

    python -c "from nemo_optim.stages.evaluate import evaluate; print(evaluate(model_path='smollm2-135m-instruct'))"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads evaluate's annotations.
"""

import json
from pathlib import Path
from typing import Optional

from nemo_optim import runtime
from nemo_optim.accuracy.multiple_choice import evaluate_multiple_choice, task_items
from nemo_optim.errors import InputError
from nemo_optim.evaluation import EvaluationConfig, EvaluationResult, LmEvalConfig, evaluate_model, evaluation_tokens
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.prelaunch import LaunchTarget, check_data_source
from nemo_optim.stage import refuse_existing_outputs, stage_entry, stage_runtime


def check_arguments(*, evaluation: Optional[EvaluationConfig] = None, launch_target: Optional[LaunchTarget] = None,
                    **_) -> None:
    """Pre-launch: the evaluation text and the task's items file are readable and valid."""
    check_data_source("evaluation.data.source", evaluation.data if evaluation else None, launch_target)
    if evaluation is not None and evaluation.accuracy is not None:
        task_items(evaluation.accuracy)
    if evaluation is not None and evaluation.lm_eval is not None:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise InputError(
                "evaluation.lm_eval needs lm-evaluation-harness: pip install 'nemo-optim[eval]'.") from None


@stage_entry(check_arguments)
def evaluate(
    *,
    model_path: str,
    reference_model_path: Optional[str] = None,
    evaluation: Optional[EvaluationConfig] = None,
    output_path: Optional[str] = None,
    devices: int = 1,
    num_nodes: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    overwrite: bool = False,
) -> EvaluationResult:
    """Stage entry: evaluates the model at `model_path` (optionally against a reference) and
    writes the result as JSON to `output_path`.

    Args:
        model_path / reference_model_path: native checkpoint, NeMo 2 checkpoint, HF directory,
            .gguf file or embedded model name.
        evaluation: text, sequence count, task accuracy, lm-eval tasks.
        output_path: where the result JSON goes (None: printed only).
        devices / num_nodes: processes per node and nodes this job was launched with.
        tp_size / pp_size: tensor / pipeline parallelism of both models.
    """
    evaluation = evaluation or EvaluationConfig()
    check_arguments(evaluation=evaluation)
    refuse_existing_outputs([("output_path", output_path)], overwrite)
    with stage_runtime(tp_size, pp_size, devices, num_nodes):
        loaded = load_model(model_path)
        reference = load_model(reference_model_path).model if reference_model_path else None
        tokenizer = load_tokenizer(loaded.hf_dir)
        tokens = evaluation_tokens(evaluation, tokenizer)
        result = evaluate_model(loaded.model, tokens, evaluation.micro_batch_size, reference)
        del reference
        if evaluation.accuracy is not None:
            accuracy = evaluate_multiple_choice(loaded.model, tokenizer, evaluation.accuracy,
                                                max_length=loaded.config.max_position_embeddings)
            result.task_accuracy = accuracy.to_dict()
        if evaluation.lm_eval is not None:
            result.lm_eval = _run_lm_eval(loaded, tokenizer, evaluation.lm_eval)
        if output_path and runtime.is_main_process():
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(output_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        runtime.print0(json.dumps(result.to_dict(), indent=2))
    return result



def _run_lm_eval(loaded, tokenizer, config: LmEvalConfig) -> dict:
    from nemo_optim.accuracy.lm_eval_adapter import NemoOptimLM, run_lm_eval

    lm = NemoOptimLM(loaded.model, tokenizer, max_length=loaded.config.max_position_embeddings,
                     batch_size=config.batch_size)
    return run_lm_eval(lm, config.tasks, include_path=config.include_path, num_fewshot=config.num_fewshot,
                       limit=config.limit)
