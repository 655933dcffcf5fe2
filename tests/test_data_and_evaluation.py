"""Embedded corpus, splits, packing, and evaluation metrics against independent computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from nemo_optim.data.corpus import DataConfig, DataError, load_documents, split_documents
from nemo_optim.data.packing import pack_tokens, packed_sequences
from nemo_optim.evaluation import EvaluationConfig, evaluate_model, evaluation_tokens
from nemo_optim.stages.evaluate import evaluate
from nemo_optim.models.loader import load_model


def test_embedded_corpus_splits_are_disjoint_deterministic_and_cover_everything():
    config = DataConfig()
    documents = load_documents(config)
    assert len(documents) > 1000 and sum(map(len, documents)) > 500_000
    splits = {name: split_documents(config, name) for name in ("train", "validation", "calibration")}
    assert sum(len(s) for s in splits.values()) == len(documents)
    assert not set(splits["validation"]) & set(splits["train"])
    assert not set(splits["calibration"]) & set(splits["train"])
    # roughly 10% / 10% / 80% by hash
    assert 0.05 < len(splits["validation"]) / len(documents) < 0.15
    assert split_documents(config, "validation") == splits["validation"]


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nstill first\n\nsecond document\n")
    assert load_documents(DataConfig(source=str(tmp_path / "a.txt"))) == ["first document\nstill first",
                                                                          "second document"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x y"}) + "\n\n" + json.dumps({"body": "z"}) + "\n")
    assert load_documents(DataConfig(source=str(tmp_path / "b.jsonl"), text_field="body")) == ["x y", "z"]
    with pytest.raises(DataError, match="b.jsonl:1: no string field 'text'"):
        load_documents(DataConfig(source=str(tmp_path / "b.jsonl")))
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="c.jsonl:1: not valid JSON"):
        load_documents(DataConfig(source=str(tmp_path / "c.jsonl")))
    with pytest.raises(DataError, match="file not found"):
        load_documents(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(DataError, match="embedded parts are pydoc, docstrings"):
        DataConfig(source="embedded:wiki")


def test_packing_concatenates_with_eos_and_drops_the_tail():
    rows = pack_tokens([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_length=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]


def test_too_few_sequences_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match="validation split .* gives \\d+ sequences of 256 tokens, 100000 requested"):
        packed_sequences(DataConfig(), "validation", tiny_tokenizer, num_sequences=100_000)


def test_perplexity_matches_transformers_loss(tiny_hf_models, tiny_tokenizer, runtime_single):
    """Oracle: transformers' own mean cross-entropy over the same packed rows."""
    evaluation = EvaluationConfig(data=DataConfig(seq_length=64), num_sequences=6, micro_batch_size=4)
    tokens = evaluation_tokens(evaluation, tiny_tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_models["qwen3"]), dtype=torch.float32)
    with torch.no_grad():
        hf_loss = hf_model(tokens[:, :-1], labels=tokens[:, :-1].clone()).loss  # HF shifts labels itself
        logits = hf_model(tokens[:, :-1]).logits
    full_loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()

    result = evaluate_model(load_model(tiny_hf_models["qwen3"]).model, tokens, micro_batch_size=4)
    assert result.tokens == 6 * 64
    assert result.loss == pytest.approx(full_loss, abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(full_loss), rel=1e-4)
    # HF's shifted loss drops the last position of each row: same order of magnitude, not equal
    assert abs(hf_loss.item() - full_loss) < 0.05
    assert result.tokens_per_second > 0


def test_kl_and_agreement_against_a_reference(tiny_hf_models, tiny_tokenizer, runtime_single):
    evaluation = EvaluationConfig(data=DataConfig(seq_length=32), num_sequences=4)
    tokens = evaluation_tokens(evaluation, tiny_tokenizer)
    model = load_model(tiny_hf_models["llama"]).model
    same = evaluate_model(model, tokens, reference=model)
    assert same.kl_to_reference == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0

    other = load_model(tiny_hf_models["llama_tied"]).model
    result = evaluate_model(model, tokens, micro_batch_size=3, reference=other)
    with torch.no_grad():
        from nemo_optim.models.forward import forward_logits

        p_log = F.log_softmax(forward_logits(other, tokens), -1)
        q_log = F.log_softmax(forward_logits(model, tokens), -1)
    hand_kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()
    hand_agree = (p_log.argmax(-1) == q_log.argmax(-1)).float().mean().item()
    assert result.kl_to_reference == pytest.approx(hand_kl, rel=1e-4)
    assert result.top1_agreement == pytest.approx(hand_agree)
    assert result.reference_perplexity == pytest.approx(
        math.exp(F.nll_loss(p_log.flatten(0, 1), tokens[:, 1:].flatten()).item()), rel=1e-4)


def test_evaluate_stage_writes_json(tiny_hf_models, tmp_path):
    output = tmp_path / "eval" / "result.json"
    result = evaluate(
        model_path=str(tiny_hf_models["qwen2"]),
        reference_model_path=str(tiny_hf_models["qwen2"]),
        evaluation=EvaluationConfig(data=DataConfig(seq_length=32), num_sequences=2),
        output_path=str(output),
    )
    written = json.loads(output.read_text())
    assert written["perplexity"] == pytest.approx(result.perplexity)
    assert written["top1_agreement"] == 1.0


def test_calibration_may_reuse_training_text_but_never_validation_text(tiny_tokenizer):
    config = DataConfig(source="embedded:pydoc", seq_length=256)
    calibration = packed_sequences(config, "calibration", tiny_tokenizer, 64)
    validation_ids = set()
    for doc in split_documents(config, "validation"):
        validation_ids.add(tuple(tiny_tokenizer(doc, add_special_tokens=False)["input_ids"][:32]))
    flat = calibration.flatten().tolist()
    text = " ".join(map(str, flat))
    for prefix in validation_ids:
        assert " ".join(map(str, prefix)) not in text
