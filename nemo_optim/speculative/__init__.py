"""Speculative decoding: `SpeculativeConfig`, EAGLE-3 / EAGLE-1 / Medusa draft heads through
ModelOpt on a frozen base model, lossless speculative greedy decoding, and the `speculative`
stage entry (nemo_optim.stages.speculative)."""
