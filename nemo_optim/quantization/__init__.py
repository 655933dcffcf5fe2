"""Post-training quantization: `QuantizationConfig`, `ExportConfig`, `Quantizer`, and the
`ptq` stage entry (nemo_optim.quantization.ptq)."""
