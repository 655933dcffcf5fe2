"""Post-training quantization: `QuantizationConfig`, `ExportConfig`, the quantize / export functions
(nemo_optim.quantization.quantizer), and the
`ptq` stage entry (nemo_optim.stages.ptq)."""
