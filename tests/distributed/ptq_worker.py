"""Run under torchrun: `ptq` with calibration_tp / calibration_pp from the command line."""

import argparse

from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.stages.ptq import ptq

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--export", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--calibration-algorithm", default=None)
    args = parser.parse_args()
    ptq(model_path=args.model, export_config=ExportConfig(path=args.export, export_format="hf", dtype="float32"),
        calibration_tp=args.tp, calibration_pp=args.pp,
        quantization_config=QuantizationConfig(algorithm="fp8", calibration_dataset_size=8, calibration_seq_len=64,
                                              calibration_algorithm=args.calibration_algorithm))
