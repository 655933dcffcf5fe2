"""The finetune stage (teacher correction): a tiny model learns the corpus, measured by an
evaluation independent of the training loop; the output is a loadable native checkpoint."""

from __future__ import annotations

import pytest

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.errors import OutputExistsError
from nemo_optim.evaluation import evaluate_model
from nemo_optim.stages.finetune import finetune
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.training import TrainingConfig


def test_finetune_lowers_held_out_perplexity_and_saves_a_checkpoint(tiny_hf_models, tmp_path):
    model_path = tiny_hf_models["llama"]
    data = DataConfig(seq_length=32)
    training = TrainingConfig(max_steps=30, global_batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=3,
                              log_interval=5, val_check_interval=15, num_val_sequences=4, checkpoint_interval=0)
    with runtime.parallel_runtime():
        loaded = load_model(model_path)
        held_out = packed_sequences(data, "validation", load_tokenizer(loaded.hf_dir), 16)
        before = evaluate_model(loaded.model, held_out).perplexity
    result = finetune(model_path=str(model_path), output_path=str(tmp_path / "out"), data=data, training=training)
    with runtime.parallel_runtime():
        after = evaluate_model(load_model(tmp_path / "out").model, held_out).perplexity
    assert after < 0.7 * before, (before, after)
    assert result.steps == 30 and result.last("validation")
    assert checkpoint.read_checkpoint_info(tmp_path / "out").manifest["producer"]["stage"] == "finetune"
    assert (tmp_path / "out_run" / "metrics.jsonl").is_file()

    with pytest.raises(OutputExistsError, match="output_path=.* exists; pass overwrite=True"):
        finetune(model_path=str(model_path), output_path=str(tmp_path / "out"), data=data, training=training)
    # an existing HF export is not replaced either (it was before: export_hf renames over it)
    with pytest.raises(OutputExistsError, match="hf_export_path=.* exists; pass overwrite=True"):
        finetune(model_path=str(model_path), output_path=str(tmp_path / "other"), hf_export_path=str(tmp_path / "out"),
                 data=data, training=training)
    assert not (tmp_path / "other").exists()
