"""The speculative stage's draft exports, served by a real engine (vLLM's CPU build, from
.venv-vllm) on the base model they were trained for: the EAGLE-3 export as
speculative_config={"method": "eagle3"}, the Medusa export as {"method": "medusa"}. Each is
lossless (vLLM's output equals its plain greedy decoding and nemo-optim's, token for token), and
vLLM's acceptance counters equal nemo-optim's measurement (`measure_draft`) on the same prompts
and draft length. One engine process serves all four jobs, with a control that must fail
(`make test-engine`)."""

from __future__ import annotations

import json
import shutil

import pytest

from nemo_optim.data.corpus import DataConfig
from nemo_optim.models.loader import load_tokenizer
from nemo_optim.serving import engine_python, run_engine
from nemo_optim.speculative import model as draft_model
from nemo_optim.speculative.config import SpeculativeConfig
from nemo_optim.speculative.data import SelfDistillationConfig, document_prompts
from nemo_optim.speculative.decoding import greedy_decode
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig, measure_draft
from nemo_optim.stages.speculative import speculative
from nemo_optim.training import TrainingConfig
from tiny_models import make_tiny_hf_model

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(engine_python() is None, reason="vLLM's engine venv is not built: make engine-venv")]

K = 3  # draft tokens per verification, in both engines
NEW_TOKENS = 32
DATA = DataConfig(seq_length=64)
# the draft learns the base model's own greedy continuations of these prompts; the engines are
# measured on the first of them, where the draft is right often enough (and wrong often enough)
# for the acceptance counters to say whether the engine's draft computes what ours does
SELF_DISTILLATION = SelfDistillationConfig(num_prompts=16, prompt_tokens=16, continuation_tokens=48)
ENGINE_PROMPTS = 6
VLLM = "vllm:spec_decode_"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_tokenizer):
    """Trains an EAGLE-3 draft (with a 256-token draft vocabulary: vLLM maps it back through the
    exported `d2t`) and Medusa heads on a tiny Llama (hidden 128: vLLM's CPU attention needs head
    size 32), exports both, measures both with nemo-optim, and serves plain greedy decoding, both
    drafts and a control in one engine process.

    The base is the random model itself, not fine-tuned as in test_speculative.py: a fine-tune of
    a few dozen steps collapses this model's greedy decoding to one repeated token, where every
    draft is accepted whatever features it reads (acceptance 3.9 of 4 here), so the counters could
    not tell a draft wired to the wrong base layers from the right one. The random model's greedy
    continuations are varied loops, which the draft learns in part."""
    root = tmp_path_factory.mktemp("drafts")
    base = make_tiny_hf_model("llama", root / "base", tiny_tokenizer, hidden_size=128)
    training = TrainingConfig(max_steps=40, global_batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2,
                              log_interval=10, val_check_interval=40, num_val_sequences=4, checkpoint_interval=40)
    drafts = {}
    for algorithm, extra in (("eagle3", {"draft_vocab_size": 256}), ("medusa", {})):
        config = SpeculativeConfig(algorithm=algorithm, num_draft_tokens=K, **extra)
        speculative(model_path=str(base), output_path=str(root / algorithm),
                    export_path=str(root / f"{algorithm}_export"), speculative_config=config, data=DATA,
                    training=training, self_distillation=SELF_DISTILLATION,
                    evaluation=SpeculativeEvaluationConfig(num_prompts=1, prompt_tokens=16, max_new_tokens=8))
        drafts[algorithm] = draft_model.load_speculative_checkpoint(root / algorithm)
    hf_dir = drafts["eagle3"].base_hf_dir
    tokenizer = load_tokenizer(hf_dir)
    prompts = document_prompts(DATA, "train", tokenizer, ENGINE_PROMPTS, SELF_DISTILLATION.prompt_tokens)
    measured = {name: measure_draft(draft.model, prompts, [K], NEW_TOKENS, tokenizer.eos_token_id).results[0]
                for name, draft in drafts.items()}
    base_model = drafts["eagle3"].model
    greedy = [greedy_decode(base_model, prompt, NEW_TOKENS, tokenizer.eos_token_id).tokens for prompt in prompts]
    # a control that must fail the comparison: ModelOpt's export as it is, which names the base
    # layers in ModelOpt's numbering only (vLLM then feeds the draft the layers one below)
    control = shutil.copytree(root / "eagle3_export", root / "eagle3_modelopt_layer_ids")
    config = json.loads((control / "config.json").read_text())
    del config["eagle_aux_hidden_state_layer_ids"]
    (control / "config.json").write_text(json.dumps(config))

    def job(name, speculative_config):
        # float32 in both engines, so that every greedy choice and every draft is the same
        return {"name": name, "model": str(hf_dir), "dtype": "float32", "prompts": prompts.tolist(),
                "max_tokens": NEW_TOKENS, "prompt_logprobs": 0, "speculative": speculative_config}

    results = run_engine([
        job("plain", None),
        job("eagle3", {"method": "eagle3", "model": str(root / "eagle3_export"), "num_speculative_tokens": K}),
        job("medusa", {"method": "medusa", "model": str(root / "medusa_export"), "num_speculative_tokens": K}),
        job("control", {"method": "eagle3", "model": str(control), "num_speculative_tokens": K}),
    ], log_path=root / "engine.log")
    return {r["name"]: r for r in results}, measured, greedy


def _acceptance(counters: dict) -> dict:
    drafts = counters[VLLM + "num_drafts"]
    return {"drafts": drafts, "accepted": counters[VLLM + "num_accepted_tokens"],
            "per_position": list(counters[VLLM + "num_accepted_tokens_per_pos"]),
            "mean_acceptance_length": 1 + counters[VLLM + "num_accepted_tokens"] / drafts}


def test_plain_engine_greedy_equals_nemo_optims_greedy(served):
    results, _, greedy = served
    assert "error" not in results["plain"], results["plain"].get("error")
    assert results["plain"]["tokens"] == greedy


@pytest.mark.parametrize("draft", ["eagle3", "medusa"])
def test_served_draft_is_lossless_and_its_acceptance_is_nemo_optims(served, draft):
    """vLLM counts, per verification of K drafts, the drafts accepted before the first rejection;
    `measure_draft` counts the same (`drafts`, `accepted_per_position`). Both engines run the same
    float32 weights and pick every token and every draft by argmax, so the counts are equal, not
    close (measured: EAGLE-3 149 drafts, 40 accepted, [30, 5, 5] per position in both; Medusa 69,
    124, [48, 42, 34] in both).

    nemo-optim's `acceptance_length` counts emitted tokens per verification, and vLLM's mean
    acceptance length (1 + accepted / drafts) is higher by exactly the drafts each prompt's last
    verification accepted past max_tokens or EOS, which the output drops: at most K per prompt
    (measured: 3 and 7 of 6 x K = 18; EAGLE-3 1.268 vs 1.248, Medusa 2.797 vs 2.696)."""
    results, measured, greedy = served
    result, ours = results[draft], measured[draft]
    assert "error" not in result, result.get("error")
    assert result["tokens"] == results["plain"]["tokens"] == greedy
    assert ours.identical_prompts == ours.num_prompts

    vllm = _acceptance(result["spec_decode"])
    print(f"\n{draft}, {ENGINE_PROMPTS} prompts x {NEW_TOKENS} tokens, {K} drafts per verification:\n"
          f"  vLLM:       {vllm['drafts']} drafts, {vllm['accepted']} accepted, per position {vllm['per_position']}, "
          f"mean acceptance length {vllm['mean_acceptance_length']:.4f}\n"
          f"  nemo-optim: {ours.drafts} drafts, {sum(ours.accepted_per_position)} accepted, per position "
          f"{ours.accepted_per_position}, acceptance length {ours.acceptance_length:.4f} "
          f"({ours.tokens} tokens)")
    assert (vllm["drafts"], vllm["per_position"]) == (ours.drafts, ours.accepted_per_position)
    assert vllm["accepted"] == sum(ours.accepted_per_position) > 0
    assert vllm["accepted"] < K * vllm["drafts"]  # (some drafts rejected: the comparison could see a wrong draft)
    # every prompt's first token comes from its prefill, every other one from a verification
    emitted = ours.tokens - ENGINE_PROMPTS
    assert ours.acceptance_length * ours.drafts == pytest.approx(emitted)
    dropped = vllm["drafts"] + vllm["accepted"] - emitted
    assert 0 <= dropped <= K * ENGINE_PROMPTS


def test_an_export_without_vllms_layer_ids_is_served_lossless_but_drafts_otherwise(served):
    """The control: the same EAGLE-3 weights with ModelOpt's layer ids only. vLLM still verifies
    every draft (the output is plain greedy decoding), but its draft reads the embeddings and the
    first layer's output instead of both layers' outputs, and the counters show it (measured:
    167 drafts, 19 accepted, [13, 3, 3] per position, against 149, 40, [30, 5, 5])."""
    results, measured, _ = served
    control, ours = results["control"], measured["eagle3"]
    assert "error" not in control, control.get("error")
    assert control["tokens"] == results["plain"]["tokens"]
    vllm = _acceptance(control["spec_decode"])
    print(f"\ncontrol: vLLM {vllm['drafts']} drafts, {vllm['accepted']} accepted, per position {vllm['per_position']}; "
          f"nemo-optim {ours.drafts}, {sum(ours.accepted_per_position)}, {ours.accepted_per_position}")
    assert (vllm["drafts"], vllm["per_position"]) != (ours.drafts, ours.accepted_per_position)
