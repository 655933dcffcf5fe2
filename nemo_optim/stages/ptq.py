"""The `ptq` stage: load -> calibrate + quantize (ModelOpt) -> save natively -> export -> verify.

Steps:
  1. check the config, the hardware and the calibration data before loading anything,
  2. load the model at calibration_tp x calibration_pp (native checkpoint, HF dir, GGUF),
  3. quantize with ModelOpt (or auto_quantize under a bit budget), print what was quantized,
  4. save the quantized model as a native checkpoint (calibration is not repeated if the
     export fails: pass that checkpoint as model_path and it is exported as is),
  5. export (unified HF, TensorRT-LLM or compressed-tensors) and verify that the export carries the format.

CPU:
    python -c "from nemo_optim.stages.ptq import ptq; from nemo_optim.quantization.config import *; \
ptq(model_path='smollm2-135m-instruct', export_config=ExportConfig(path='/tmp/fp8'))"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads ptq's annotations.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
from pathlib import Path
from typing import Optional

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import load_documents
from nemo_optim.models.forward import greedy_sample
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.prelaunch import LaunchTarget, check_data_source
from nemo_optim.quantization.compressed_tensors import check_foldable
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig, QuantizationConfigError
from nemo_optim.quantization.quantizer import (
    auto_quantize,
    export_quantized,
    is_quantized,
    quantize,
    stored_quantization_config,
)
from nemo_optim.stage import refuse_existing_outputs, stage_entry, stage_runtime

DEFAULT_EXPORT_PATH = "outputs/ptq_export"


def check_arguments(*, quantization_config: Optional[QuantizationConfig] = None,
                    export_config: Optional[ExportConfig] = None, launch_target: Optional[LaunchTarget] = None,
                    calibration_tp: int = 1, calibration_pp: int = 1, devices: Optional[int] = None,
                    num_nodes: Optional[int] = None, **_) -> None:
    """Pre-launch: formats that need a GPU the job will not get, formats the chosen exporter
    cannot write, a calibration file that is missing or malformed, and a resumable calibration
    the job's ModelOpt or process count cannot run."""
    quantization_config = quantization_config or QuantizationConfig()
    export_config = export_config or ExportConfig()
    if launch_target is None or launch_target.local:  # (a remote job checks with its own ModelOpt)
        quantization_config.check_layerwise_checkpoint(
            max(calibration_tp * calibration_pp, (devices or 1) * (num_nodes or 1)))
    if launch_target is not None and launch_target.gpus is not None:
        quantization_config.check_hardware(
            launch_target.gpus > 0,
            "this machine has none" if launch_target.local else "the executor gives the job none (gpus_per_node)")
    quantization_config.check_export_format(export_config.export_format)
    if quantization_config.algorithm is not None or quantization_config.custom_config_path:
        check_data_source("quantization_config.calibration_dataset", quantization_config.calibration_data(),
                          launch_target)


def _producer(model_path: str, quantization_config: QuantizationConfig) -> dict:
    return {"stage": "ptq", "source": str(model_path), "quantization_config": dataclasses.asdict(quantization_config)}


def resumable_outputs(*, model_path: str, export_path: Optional[str] = None, output_path: Optional[str] = None,
                      quantization_config: Optional[QuantizationConfig] = None, overwrite: bool = False,
                      **_) -> set[str]:
    """{"output_path"} when it holds this very calibration (a run whose export failed left it): the
    rerun exports it instead of refusing it or calibrating again."""
    output_path = output_path or f"{(export_path or DEFAULT_EXPORT_PATH).rstrip('/')}_native"
    written = checkpoint.written_by(output_path, _producer(model_path, quantization_config or QuantizationConfig()))
    return {"output_path"} if written and not overwrite else set()


@stage_entry(check_arguments, resumable_outputs)
def ptq(
    *,
    model_path: str,
    export_path: Optional[str] = None,
    export_config: Optional[ExportConfig] = None,
    calibration_tp: int = 1,
    calibration_pp: int = 1,
    quantization_config: Optional[QuantizationConfig] = None,
    tokenizer_path: Optional[str] = None,
    trust_remote_code: bool = False,
    devices: Optional[int] = None,
    num_nodes: Optional[int] = None,
    output_path: Optional[str] = None,
    overwrite: bool = False,
    model_dtype: Optional[str] = None,
    transformer_impl: Optional[str] = None,
    save_path: Optional[str] = None,
) -> Path:
    """Stage entry (NeMo 2's `llm.ptq` arguments; its `export_config.path` is accepted for
    `export_path`, and `save_path` for `output_path`): quantize `model_path` and export it.

    Args:
        model_path: native checkpoint, HF directory, .gguf file or embedded model name. A native
            checkpoint that is already quantized is exported without recalibrating.
        export_path: where the export goes (default: outputs/ptq_export).
        export_config: the export's format and dtype.
        calibration_tp / calibration_pp: parallelism used for calibration (launch TP x PP processes).
        quantization_config: algorithm, calibration data and exclusions.
        tokenizer_path: tokenizer directory if not the model's own.
        trust_remote_code: accepted for NeMo 2 compatibility; only built-in architectures load.
        devices / num_nodes: processes per node and nodes this job was launched with (None: not
            checked; the job needs calibration_tp x calibration_pp processes or a multiple).
        output_path: native checkpoint of the quantized model (default: `<export_path>_native`).
        model_dtype: parameter dtype while calibrating (float32 on CPU, bfloat16 on GPU).
        transformer_impl: layer spec (local on CPU; modelopt/transformer_engine on GPU).
    """
    export_path = export_path or DEFAULT_EXPORT_PATH
    export_config = dataclasses.replace(export_config or ExportConfig(), path=export_path)
    quantization_config = quantization_config or QuantizationConfig()
    output_path = output_path or f"{export_path.rstrip('/')}_native"
    # 1. everything that can be checked before loading a model
    quantization_config.check_hardware(runtime.use_cuda())
    check_arguments(quantization_config=quantization_config, export_config=export_config,
                    calibration_tp=calibration_tp, calibration_pp=calibration_pp, devices=devices, num_nodes=num_nodes)
    if quantization_config.algorithm is not None or quantization_config.custom_config_path:
        load_documents(quantization_config.calibration_data())
    producer = _producer(model_path, quantization_config)
    resumed = bool(resumable_outputs(model_path=model_path, export_path=export_path, output_path=output_path,
                                     quantization_config=quantization_config, overwrite=overwrite))
    refuse_existing_outputs([("export_path", export_path)] + ([] if resumed else [("output_path", output_path)]),
                            overwrite)
    if tokenizer_path is not None and not Path(tokenizer_path).is_dir():
        raise QuantizationConfigError(f"tokenizer_path={tokenizer_path!r}: directory not found.")

    with stage_runtime(calibration_tp, calibration_pp, devices, num_nodes,
                       tp_field="calibration_tp", pp_field="calibration_pp"):
        if resumed:
            runtime.print0(f"output_path={output_path!r} holds this calibration (an earlier run's): exporting it.")
        loaded = load_model(output_path if resumed else model_path, dtype=model_dtype,
                            transformer_impl=transformer_impl)
        tokenizer = load_tokenizer(tokenizer_path or loaded.hf_dir)
        model = loaded.model
        quantized_checkpoint = loaded.source.path
        if is_quantized(model):
            stored = stored_quantization_config(loaded.source.path)
            if stored is not None:
                stored.check_export_format(export_config.export_format)
                quantization_config = stored
            if not resumed:
                runtime.print0(f"{model_path} is already quantized ({quantization_config.algorithm}): "
                               f"exporting without recalibration.")
        else:
            if export_config.export_format == "compressed_tensors":
                check_foldable(quantization_config, loaded.config.num_attention_heads,
                               loaded.config.num_query_groups or loaded.config.num_attention_heads)
            if quantization_config.auto_quantize_bits is not None:
                model, summary = auto_quantize(
                    model, quantization_config, tokenizer,
                    fresh_model=lambda: load_model(model_path, dtype=model_dtype,
                                                   transformer_impl=transformer_impl).model)
            else:
                model, summary = quantize(model, quantization_config, tokenizer=tokenizer)
            summary = dataclasses.asdict(summary) if summary else None
            checkpoint.save_checkpoint(model, loaded.config, output_path, loaded.hf_dir,
                                       producer={**producer, "summary": summary})
            runtime.print0(f"quantized native checkpoint: {output_path}")
            quantized_checkpoint = output_path
        if export_config.export_format != "hf" and runtime.world_size() > 1:
            export_path = _export_in_one_process(quantized_checkpoint, quantization_config, export_config)
        else:
            if calibration_tp > 1:
                # ModelOpt's HF exporter writes TP shards into one file: export a TP=1 reload
                # (dist-checkpointing reshards it; data parallel takes the other processes)
                runtime.set_model_parallel_sizes(runtime.ParallelConfig(pipeline_model_parallel_size=calibration_pp))
                model = load_model(quantized_checkpoint).model
            export_path = export_quantized(model, quantization_config, export_config, loaded.hf_dir,
                                           loaded.config.hf_architecture,
                                           release_model=not export_config.generate_sample)
        runtime.print0(f"{export_config.export_format} export: {export_path}")
        if export_config.generate_sample:
            runtime.print0(f"sample: {greedy_sample(model, tokenizer)!r}")
    return export_path


def _export_in_one_process(quantized_checkpoint: str | Path, quantization_config: QuantizationConfig,
                           export_config: ExportConfig) -> Path:
    """ModelOpt's TensorRT-LLM exporter takes every process of the job for a TP or PP shard of the
    model (and merges the shards through one node's shared memory) and compressed-tensors is written
    from one whole model: a new process, alone in its process group, exports the saved checkpoint;
    the job's processes wait for it."""
    error = None
    if runtime.is_main_process():
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                pool.submit(_export_alone, str(quantized_checkpoint), quantization_config, export_config).result()
            except Exception as failure:  # noqa: BLE001 - every rank raises it below
                error = failure
    error = runtime.broadcast_object(error)
    if error is not None:
        raise error
    return Path(export_config.path)


def _export_alone(quantized_checkpoint: str, quantization_config: QuantizationConfig,
                  export_config: ExportConfig) -> None:
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                     "MASTER_PORT"):
        os.environ.pop(variable, None)  # (torchrun's: this process is not one of the job's ranks)
    with runtime.parallel_runtime():
        loaded = load_model(quantized_checkpoint)
        export_quantized(loaded.model, quantization_config, export_config, loaded.hf_dir,
                         loaded.config.hf_architecture, release_model=True)
