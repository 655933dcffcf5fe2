"""Import a model into a native checkpoint, and export a model to HF or to a NeMo 2 checkpoint.

Steps of `import_ckpt`:
  1. resolve the source (HF directory, GGUF file, embedded model name, native checkpoint),
  2. build the megatron-core model and load the weights (ModelOpt's HF importer),
  3. evaluate it on the embedded corpus (perplexity, tokens/s),
  4. save the native checkpoint (atomic), 5. optionally export to HF and check that
     transformers reloads the export with the same logits.

    python -c "from nemo_optim.stages.convert import import_ckpt; \
import_ckpt(model_path='smollm2-135m-instruct', output_path='/tmp/smollm2')"
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads the stage entry
# function's annotations as real types.

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Optional

from nemo_optim import checkpoint, runtime
from nemo_optim.errors import InputError
from nemo_optim.evaluation import EvaluationConfig, EvaluationResult, evaluate_model, evaluation_tokens
from nemo_optim.models.config import DTYPES
from nemo_optim.models.hf import export_hf, hf_export_logit_diff
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.quantization.quantizer import is_quantized
from nemo_optim.stage import refuse_existing_outputs, stage_entry, stage_runtime


@dataclasses.dataclass
class ImportReport:
    source: str
    checkpoint_path: str
    hf_export_path: str | None
    num_parameters: int
    import_seconds: float
    save_seconds: float
    export_seconds: float | None
    export_max_logit_diff: float | None
    """max |logit| difference between the megatron model and transformers reloading the export."""
    peak_rss_gib: float
    evaluation: EvaluationResult | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"source:            {self.source}",
            f"parameters:        {self.num_parameters / 1e6:.1f} M",
            f"native checkpoint: {self.checkpoint_path}",
            f"HF export:         {self.hf_export_path or '-'}",
            f"import / save / export seconds: {self.import_seconds:.1f} / {self.save_seconds:.1f} / "
            f"{self.export_seconds if self.export_seconds is None else round(self.export_seconds, 1)}",
            f"peak memory:       {self.peak_rss_gib:.2f} GiB",
        ]
        if self.export_max_logit_diff is not None:
            lines.append(f"export parity:     max |logit diff| vs transformers = {self.export_max_logit_diff:.2e}")
        if self.evaluation is not None:
            e = self.evaluation
            lines.append(
                f"perplexity:        {e.perplexity:.3f} (loss {e.loss:.4f} on {e.tokens} tokens, "
                f"{e.tokens_per_second:.0f} tokens/s)"
            )
        return "\n".join(lines)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def check_import_arguments(*, dtype: str = "float32", **_) -> None:
    """Pre-launch (and at the start): the dtype is known."""
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")


@stage_entry(check_import_arguments)
def import_ckpt(
    *,
    model_path: str,
    output_path: str,
    hf_export_path: Optional[str] = None,
    evaluation: Optional[EvaluationConfig] = None,
    dtype: str = "float32",
    overwrite: bool = False,
    source: Optional[str] = None,
) -> ImportReport:
    """Stage entry: import `model_path` into a native checkpoint at `output_path` (NeMo 2's
    `source` is accepted for `model_path`).

    Args:
        model_path: HF directory, .gguf file, embedded model name, or native checkpoint.
        output_path: where the native checkpoint goes.
        hf_export_path: if set, also export to HF there and check transformers' logits.
        evaluation: if set, evaluate the imported model (perplexity, tokens/s).
        dtype: parameter dtype (float32 on CPU, bfloat16 on GPU).
    """
    check_import_arguments(dtype=dtype)
    refuse_existing_outputs([("output_path", output_path), ("hf_export_path", hf_export_path)], overwrite)
    with stage_runtime():
        began = time.perf_counter()
        loaded = load_model(model_path, dtype=dtype)
        import_seconds = time.perf_counter() - began
        tokenizer = load_tokenizer(loaded.hf_dir)
        result = None
        tokens = None
        if evaluation is not None:
            tokens = evaluation_tokens(evaluation, tokenizer)
            result = evaluate_model(loaded.model, tokens, evaluation.micro_batch_size)

        began = time.perf_counter()
        checkpoint.save_checkpoint(
            loaded.model, loaded.config, output_path, loaded.hf_dir,
            producer={"stage": "import_ckpt", "source": str(model_path), "dtype": dtype},
        )
        save_seconds = time.perf_counter() - began

        export_seconds = logit_diff = None
        if hf_export_path:
            began = time.perf_counter()
            export_hf(loaded.model, loaded.hf_dir, hf_export_path, dtype=loaded.config.torch_dtype)
            export_seconds = time.perf_counter() - began
            if runtime.world_size() == 1 and tokens is not None:
                logit_diff = hf_export_logit_diff(loaded.model, Path(hf_export_path), tokens[:1])

        report = ImportReport(
            source=str(model_path),
            checkpoint_path=str(output_path),
            hf_export_path=hf_export_path,
            num_parameters=loaded.config.num_parameters(),
            import_seconds=import_seconds,
            save_seconds=save_seconds,
            export_seconds=export_seconds,
            export_max_logit_diff=logit_diff,
            peak_rss_gib=_peak_rss_gib(),
            evaluation=result,
        )
        if runtime.is_main_process():
            (Path(output_path) / "import_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        runtime.print0(report.summary())
    return report


EXPORT_TARGETS = ("hf", "nemo2")


def check_export_arguments(*, target: str = "hf", dtype: str = "bfloat16", **_) -> None:
    """Pre-launch (and at the start): the export target and dtype are known."""
    if target not in EXPORT_TARGETS:
        raise InputError(f"target={target!r}: choose one of {', '.join(EXPORT_TARGETS)}.")
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")


@stage_entry(check_export_arguments)
def export_ckpt(
    *,
    model_path: str,
    output_path: str,
    target: str = "hf",
    dtype: str = "bfloat16",
    overwrite: bool = False,
    path: Optional[str] = None,
) -> Path:
    """Stage entry (NeMo 2's `llm.export_ckpt`; its `path` is accepted for `model_path`): export
    the model at `model_path` (native checkpoint, NeMo 2 checkpoint, HF directory, GGUF) as
    `target`: "hf" (an HF directory) or "nemo2" (a NeMo 2 checkpoint directory that NeMo 2
    containers load: pruned and distilled students included)."""
    check_export_arguments(target=target, dtype=dtype)
    refuse_existing_outputs([("output_path", output_path)], overwrite)
    with stage_runtime():
        loaded = load_model(model_path)
        if target == "hf":
            export_hf(loaded.model, loaded.hf_dir, output_path, dtype=DTYPES[dtype])
        else:
            from nemo_optim.models.nemo2 import write_nemo2_checkpoint

            if is_quantized(loaded.model):
                raise InputError(f"model_path={model_path!r} is quantized: target='nemo2' writes unquantized models "
                                 f"(NeMo 2 deploys quantized ones through TensorRT-LLM); export it with `ptq` instead.")
            model = loaded.model.to(DTYPES[dtype])
            write_nemo2_checkpoint(model, dataclasses.replace(loaded.config, dtype=dtype), output_path, loaded.hf_dir)
    runtime.print0(f"{target} export: {output_path}")
    return Path(output_path)
