"""One module per stage entry, each a typed function on the skeleton in `nemo_optim.stage`
(what `nemo llm <stage>` runs). The work they call lives in the library packages:

    convert.py      import_ckpt, export_ckpt   models/ (megatron builders, HF / GGUF / NeMo 2 I/O)
    evaluate.py     evaluate                   evaluation.py, accuracy/
    ptq.py          ptq                        quantization/ (configs, quantize, auto_quantize, export)
    prune.py        prune                      pruning/ (config, Minitron / layer dropping)
    finetune.py     finetune                   training.py
    distill.py      distill                    distillation/ (config, ModelOpt KD model), training.py
    speculative.py  speculative                speculative/ (draft heads, decoding, measurement)
"""
