"""Speculative decoding on a tiny real Llama: ModelOpt's EAGLE-3 / Medusa heads train (loss
falls), speculative greedy decoding equals plain KV-cached greedy decoding token for token,
the acceptance length of a draft that knows the answer is k + 1 (the oracle of the decoding
loop), the KV-cached EAGLE drafter drafts what ModelOpt's own uncached drafting drafts, and the
saved checkpoint and the serving export reload to the same draft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_optim.data.corpus import DataConfig
from nemo_optim.stages.finetune import finetune
from nemo_optim.models.loader import load_tokenizer
from nemo_optim.speculative import model as draft_model
from nemo_optim.speculative.config import SpeculativeConfig, SpeculativeConfigError
from nemo_optim.speculative.data import SelfDistillationConfig
from nemo_optim.speculative.decoding import (EagleDrafter, ReferenceDrafter, drafter_for, greedy_decode,
                                             speculative_decode)
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig
from nemo_optim.stages.speculative import speculative
from nemo_optim.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
DATA = DataConfig(seq_length=64)
EVALUATION = SpeculativeEvaluationConfig(num_prompts=3, prompt_tokens=16, max_new_tokens=40, draft_lengths=[1, 3])


@pytest.fixture(scope="module")
def trained_base(tiny_hf_models, tmp_path_factory) -> Path:
    """A tiny Llama fine-tuned on the corpus (a random one predicts near-uniform tokens, which
    no draft can learn), as a native checkpoint: the stage also exports it to HF for the draft."""
    output = tmp_path_factory.mktemp("base") / "native"
    finetune(model_path=str(tiny_hf_models["llama"]), output_path=str(output), data=DATA,
             training=TrainingConfig(max_steps=40, global_batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=4,
                                     val_check_interval=0, checkpoint_interval=0))
    return output


def _training(steps: int) -> TrainingConfig:
    return TrainingConfig(max_steps=steps, global_batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=2,
                          log_interval=2, val_check_interval=steps, num_val_sequences=4, checkpoint_interval=steps)


def _converted(base_path: Path, config: SpeculativeConfig):
    hf_dir = draft_model.base_hf_directory(base_path)
    return draft_model.add_draft_heads(draft_model.load_base(hf_dir), config).eval(), load_tokenizer(hf_dir)


def _prompt(tokenizer, text: str = "The for statement is used to iterate") -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("algorithm", ["eagle3", "medusa"])
def test_draft_trains_decodes_losslessly_and_reloads(trained_base, tmp_path, algorithm):
    config = SpeculativeConfig(algorithm=algorithm, num_draft_tokens=3)
    output, export = tmp_path / "draft", tmp_path / "draft_export"
    result = speculative(model_path=str(trained_base), output_path=str(output), export_path=str(export),
                         speculative_config=config, data=DATA, training=_training(24), evaluation=EVALUATION,
                         self_distillation=SelfDistillationConfig(num_prompts=24, prompt_tokens=16,
                                                                  continuation_tokens=80))
    # EAGLE's loss is the cross-entropy to the base model's distribution, whose entropy it
    # cannot train away (about 14 nats here over 3 steps): a fall of 0.25 nats is real learning
    losses = [row["loss"] for row in result.training.history if row["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.25, losses
    assert result.evaluation["lossless"]
    assert [r["draft_length"] for r in result.evaluation["results"]] == [1, 3]
    assert all(1.0 <= r["acceptance_length"] <= r["draft_length"] + 1 for r in result.evaluation["results"])
    assert json.loads((output / "evaluation.json").read_text()) == result.evaluation

    # the checkpoint restores the trained draft: same drafts, same acceptance, same tokens
    reloaded = draft_model.load_speculative_checkpoint(output)
    tokenizer = load_tokenizer(reloaded.base_hf_dir)
    prompt = _prompt(tokenizer)
    plain = greedy_decode(reloaded.model, prompt, 40)
    decoded = speculative_decode(reloaded.model, drafter_for(reloaded.model), prompt, 40, 3)
    assert decoded.tokens == plain.tokens

    # the serving export holds exactly the trained draft: loaded into a fresh draft, it decodes the same
    fresh = draft_model.SpeculativeModel(_converted(trained_base, config)[0], config, reloaded.base_hf_dir)
    draft_model.load_exported_draft(fresh, export)
    again = speculative_decode(fresh.model, drafter_for(fresh.model), prompt, 40, 3)
    assert again.tokens == plain.tokens and again.accepted_per_round == decoded.accepted_per_round
    for name, tensor in draft_model.draft_state_dict(reloaded.model).items():
        torch.testing.assert_close(draft_model.draft_state_dict(fresh.model)[name], tensor, rtol=0, atol=0)


def test_acceptance_of_a_draft_that_knows_the_answer_is_k_plus_one(trained_base):
    model, tokenizer = _converted(trained_base, SpeculativeConfig(algorithm="eagle3"))
    prompt = _prompt(tokenizer)
    plain = greedy_decode(model, prompt, 41)
    for k in (1, 2, 4):
        decoded = speculative_decode(model, ReferenceDrafter(plain.tokens), prompt, 41, k)
        assert decoded.tokens == plain.tokens
        # 1 token from the prompt's forward, then k + 1 per round; 40 = 8 x 5, so every round is whole for k=4
        assert decoded.accepted_per_round[:-1] == [k + 1] * (len(decoded.accepted_per_round) - 1)
        assert sum(decoded.accepted_per_round) == 40
    untrained = speculative_decode(model, drafter_for(model), prompt, 41, 4)
    assert untrained.tokens == plain.tokens
    # an end-of-text token inside an accepted chain ends the output there, and no round after it counts
    eos = plain.tokens[10]
    plain_eos = greedy_decode(model, prompt, 41, eos)
    stopped = speculative_decode(model, ReferenceDrafter(plain.tokens), prompt, 41, 4, eos)
    assert stopped.tokens == plain_eos.tokens and stopped.tokens[-1] == eos
    assert sum(stopped.accepted_per_round) == len(plain_eos.tokens) - 1


def test_kv_cached_eagle_drafts_equal_modelopts_uncached_drafting(trained_base):
    """ModelOpt's `pseudo_speculative_generate` recomputes the draft over the whole prefix at
    every step; our drafter keeps the draft's KV cache across rounds and cuts it back after each
    verification. Both must propose the same tokens at every point of a generation."""
    model, tokenizer = _converted(trained_base, SpeculativeConfig(algorithm="eagle3"))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial draft: perturb the fresh draft's weights
        for name, param in model.named_parameters():
            if draft_model.is_draft_key(name):
                param.add_(0.05 * torch.randn_like(param))
    prompt = _prompt(tokenizer)

    proposals = []

    class Recording(EagleDrafter):
        def propose(self, k):
            drafts = super().propose(k)
            proposals.append(drafts)
            return drafts

    decoded = speculative_decode(model, Recording(model), prompt, 24, 3)
    assert len(proposals) == len(decoded.accepted_per_round) > 3
    emitted = 1  # the prompt's forward emits the first token
    for drafts, accepted in zip(proposals, decoded.accepted_per_round):
        # ModelOpt is given what the base model has read; it predicts the pending token itself
        fed = prompt.tolist() + decoded.tokens[: emitted - 1]
        base_token, reference = model.pseudo_speculative_generate(torch.tensor([fed]), steps=3)
        assert int(base_token) == decoded.tokens[emitted - 1]
        assert reference[0].tolist() == drafts
        emitted += accepted


def test_self_distillation_rows_are_the_base_models_greedy_continuations(trained_base):
    import dataclasses

    from nemo_optim.data.packing import packed_sequences
    from nemo_optim.speculative.data import document_prompts, training_rows

    hf_dir = draft_model.base_hf_directory(trained_base)
    base, tokenizer = draft_model.load_base(hf_dir), load_tokenizer(hf_dir)
    data = DataConfig(seq_length=16)
    config = SelfDistillationConfig(num_prompts=4, prompt_tokens=8, continuation_tokens=24, batch_size=2)
    rows = training_rows(base, hf_dir, data, tokenizer, config)
    # oracle: the first prompt continued by the plain KV-cached greedy loop, one prompt at a time
    prompt = document_prompts(data, "train", tokenizer, 4, 8)[0]
    continuation = greedy_decode(base, prompt, 24, tokenizer.eos_token_id).tokens
    expected = prompt.tolist() + [t for t in continuation if t != tokenizer.eos_token_id]
    assert rows.flatten().tolist()[: len(expected)] == expected
    mixed = training_rows(base, hf_dir, data, tokenizer, dataclasses.replace(config, with_source_text=True))
    assert torch.equal(mixed[: len(rows)], rows)  # the cached generation is reused
    assert len(mixed) == len(rows) + len(packed_sequences(data, "train", tokenizer))


def test_bad_settings_give_one_line_and_write_nothing(trained_base, tmp_path):
    with pytest.raises(SpeculativeConfigError, match=r"algorithm='eagle9': choose one of eagle3, eagle1, medusa"):
        SpeculativeConfig(algorithm="eagle9")
    with pytest.raises(SpeculativeConfigError, match=r"num_draft_tokens=0 must be a positive integer"):
        SpeculativeConfig(num_draft_tokens=0)
    with pytest.raises(SpeculativeConfigError, match=r"dtype='fp8': choose float32, bfloat16 or None"):
        speculative(model_path=str(trained_base), output_path=str(tmp_path / "out"), dtype="fp8")
    with pytest.raises(SpeculativeConfigError, match=r"needs 5 Medusa heads; set speculative_config.num_medusa_heads"):
        speculative(model_path=str(trained_base), output_path=str(tmp_path / "out"),
                    speculative_config=SpeculativeConfig(algorithm="medusa", num_draft_tokens=2),
                    evaluation=SpeculativeEvaluationConfig(draft_lengths=[5]))
    # a speculative checkpoint as the base: it already has draft heads
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text(json.dumps({"format": draft_model.FORMAT}))
    with pytest.raises(SpeculativeConfigError, match="already has draft heads"):
        speculative(model_path=str(done), output_path=str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]


def test_launch_trains_a_draft_through_nemo_runs_local_executor(trained_base, tmp_path, capsys):
    import launch

    output = tmp_path / "eagle3"
    code = launch.main(["speculative_recipe", f"model_path={trained_base}", f"output_path={output}",
                        f"export_path={output}_export", "training.max_steps=2", "data.seq_length=64",
                        "evaluation.num_prompts=1", "evaluation.prompt_tokens=16", "evaluation.max_new_tokens=8",
                        "--yes"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "speculative_recipe: SUCCEEDED" in out
    assert json.loads((output / "evaluation.json").read_text())["lossless"]
    assert (json.loads((tmp_path / "eagle3_export" / "config.json").read_text())["architectures"]
            == ["LlamaForCausalLMEagle3"])


def test_cli_refuses_an_unknown_algorithm_in_one_line(tmp_path):
    output = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "launch.py", "speculative_recipe", "speculative_config.algorithm=eagle9",
         f"output_path={output}", f"export_path={output}_export", "--yes"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: speculative_recipe: override 'speculative_config.algorithm=eagle9': expected one of 'eagle3', "
        "'eagle1', 'medusa', got 'eagle9'")
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_experiment_trains_both_drafts_and_reports_them(trained_base, tmp_path):
    """The experiment's tasks as NeMo-Run would run them (serialized, then fdl.build(task)());
    a re-run skips both drafts; the report has a row per draft length of each draft."""
    import fiddle as fdl
    import nemo_run as run

    from experiments.speculative_smollm2 import speculative_tasks

    work = tmp_path / "work"
    tasks = speculative_tasks(model=str(trained_base), work_dir=str(work), eagle3_steps=2, medusa_steps=2,
                              self_distillation_prompts=16, seq_length=64, draft_vocab_size=128, eval_prompts=2,
                              max_new_tokens=16)
    serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
    tasks = {name: serializer.deserialize(serializer.serialize(task)) for name, task in tasks.items()}
    assert [fdl.build(task)() for task in tasks.values()][:2] == ["ran", "ran"]
    assert [fdl.build(tasks[name])() for name in ("eagle3", "medusa")] == ["skipped", "skipped"]
    rows = json.loads((work / "report" / "report.json").read_text())["speculative"]
    assert [(row["draft"], row["draft_length"]) for row in rows] == [
        (draft, k) for draft in ("eagle3", "medusa") for k in (1, 2, 3, 4, 5)]
    assert all(row["identical_prompts"] == row["num_prompts"] == 2 for row in rows)
    assert (work / "report" / "speculative.png").is_file() and (work / "eagle3_export" / "config.json").is_file()


@pytest.mark.distributed
def test_two_data_parallel_processes_train_the_same_draft_as_one(tiny_hf_models, tmp_path):
    """torchrun with 2 processes: each trains on half of every global batch, gradients are
    averaged; the losses and the trained draft equal one process's; rank 0 alone measures."""
    from safetensors.torch import load_file

    worker = REPO / "tests" / "distributed" / "speculative_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    runs = {}
    for name, launcher in (("single", [sys.executable]),
                           ("parallel", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"])):
        completed = subprocess.run(launcher + [str(worker), "--model", str(tiny_hf_models["llama"]),
                                               "--output", str(tmp_path / name)],
                                   capture_output=True, text=True, env=env, timeout=600)
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
        runs[name] = completed.stdout
    assert runs["parallel"].count("lossless True") == 2  # both ranks get rank 0's measurement
    histories = {name: [json.loads(line)
                        for line in (tmp_path / f"{name}_run" / "metrics.jsonl").read_text().splitlines()]
                 for name in runs}
    assert ([(r["kind"], r["step"]) for r in histories["parallel"]]
            == [(r["kind"], r["step"]) for r in histories["single"]])
    for want, have in zip(histories["single"], histories["parallel"]):
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-4), (want, have)
    single, parallel = (load_file(str(tmp_path / name / "draft.safetensors")) for name in ("single", "parallel"))
    assert single.keys() == parallel.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-4, atol=1e-5)
