"""The `ptq` stage with resumable layer-wise calibration; `--kill-at-layer N` SIGKILLs this process
when ModelOpt is about to record decoder layer N as finished (layers 0..N-1 are recorded, layer N
is calibrated and lost), as a Slurm time limit would."""

import argparse
import os
import signal

from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.stages.ptq import ptq

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--algorithm", default="fp8")
    parser.add_argument("--export-format", default="hf")
    parser.add_argument("--kill-at-layer", type=int, default=None)
    args = parser.parse_args()
    if args.kill_at_layer is not None:
        from modelopt.torch.quantization.utils import layerwise_calib

        record = layerwise_calib._CheckpointState.save

        def record_or_die(self, layer_idx, *rest, **kwargs):
            if layer_idx == args.kill_at_layer:
                os.kill(os.getpid(), signal.SIGKILL)
            return record(self, layer_idx, *rest, **kwargs)

        layerwise_calib._CheckpointState.save = record_or_die
    ptq(model_path=args.model,
        export_config=ExportConfig(path=args.export, export_format=args.export_format, dtype="float32"),
        quantization_config=QuantizationConfig(algorithm=args.algorithm, calibration_dataset_size=8,
                                              calibration_seq_len=64, calibration_checkpoint_dir=args.checkpoint_dir))
