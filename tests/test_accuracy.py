"""Task accuracy: items files and the embedded cloze task, log-likelihoods against transformers,
the lm-eval adapter against lm-eval's own Hugging Face backend, the evaluate stage and report,
bad items files through the real CLI, and TP/PP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers

from nemo_optim.accuracy.items import TaskDataError, embedded_cloze_items, read_items
from nemo_optim.accuracy.multiple_choice import (
    AccuracyConfig, build_prompt, choice_log_likelihoods, evaluate_multiple_choice, task_items,
)
from nemo_optim.accuracy.scoring import encode_pair
from nemo_optim.data.corpus import DataConfig, split_documents
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.models.loader import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _hf_choice_log_likelihoods(hf_dir, items, examples, max_length: int = 256) -> list[list[float]]:
    """Oracle: transformers' forward over each prompt + choice (the last `max_length + 1`
    tokens, as lm-eval truncates), summed log-probabilities of the choice."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    scores = []
    for item in items:
        prompt = build_prompt(item, examples[item.subject])
        choices = "ABCDEFGH"[: len(item.choices)] if item.style == "letters" else item.choices
        row = []
        for choice in choices:
            context, continuation = encode_pair(tokenizer, prompt, " " + choice)
            ids = torch.tensor([(context + continuation)[-(max_length + 1):]])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            targets = torch.tensor(continuation)
            row.append(log_probs[-len(continuation):].gather(-1, targets[:, None]).sum().item())
        scores.append(row)
    return scores


def _write_lm_eval_task(directory: Path, items) -> Path:
    """A local lm-eval multiple-choice task over `items` (lm-eval's JSON loader, no hub)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "items.jsonl"
    data.write_text("".join(json.dumps({"query": i.question, "choices": list(i.choices), "gold": i.answer}) + "\n"
                            for i in items))
    (directory / "tiny_cloze.yaml").write_text(
        "task: tiny_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return data


@pytest.fixture(autouse=True)
def _offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_embedded_cloze_items_are_held_out_next_sentences():
    items = embedded_cloze_items()
    assert len(items) > 100 and items == embedded_cloze_items()  # deterministic
    validation = [" ".join(doc.split()) for doc in split_documents(DataConfig(), "validation")]
    train = [" ".join(doc.split()) for doc in split_documents(DataConfig(), "train")]
    truths = {item.choices[item.answer] for item in items}
    for item in items:
        truth = item.choices[item.answer]
        # the true choice is the sentence that follows the context in a held-out document
        assert any(item.question + " " + truth in doc for doc in validation)
        assert not any(item.question in doc or truth in doc for doc in train)
        assert len(set(item.choices)) == 4
        assert all(choice in truths for choice in item.choices)  # distractors: other items' true sentences
    answers = [item.answer for item in items]
    assert all(answers.count(k) > 0.15 * len(items) for k in range(4))


def test_items_files_in_mmlu_and_lm_eval_shapes(tmp_path):
    mmlu = tmp_path / "abstract_algebra_test.csv"  # MMLU's own header-less layout
    mmlu.write_text('"Find the order of the group Z_4.",2,4,8,16,B\nIs 7 prime?,yes,no,maybe,never,A\n')
    items = read_items(mmlu)
    assert [(i.answer, i.subject, i.style) for i in items] == [(1, "abstract algebra", "letters"),
                                                               (0, "abstract algebra", "letters")]
    # lm-eval's MMLU prompt, one shot
    assert build_prompt(items[1], [items[0]]) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the order of the group Z_4.\nA. 2\nB. 4\nC. 8\nD. 16\nAnswer: B\n\n"
        "Is 7 prime?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer:"
    )
    cloze = tmp_path / "cloze.jsonl"
    cloze.write_text(json.dumps({"query": "The sky is", "choices": ["blue.", "green."], "gold": 0}) + "\n"
                     + json.dumps({"question": "2+2=?", "choices": {"text": ["3", "4"], "label": ["A", "B"]},
                                   "answerKey": "B", "subject": "math"}) + "\n")
    first, second = read_items(cloze)
    assert (first.style, first.answer, build_prompt(first, [])) == ("cloze", 0, "The sky is")
    assert (second.style, second.answer, second.subject) == ("letters", 1, "math")


BAD_ITEMS = {
    "missing": (None, "file not found"),
    "no_answer": ({"question": "q?", "choices": ["a", "b"]}, "row 1: field 'answer' is missing"),
    "out_of_range": ({"question": "q?", "choices": ["a", "b"], "answer": 5},
                     "row 1: field 'answer'=5 is out of range for 2 choices"),
    "empty_choices": ({"question": "q?", "choices": [], "answer": 0},
                      "row 1: field 'choices' must hold at least two non-empty strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_bad_items_file_is_one_line_through_the_cli_and_nothing_is_written(case, tiny_hf_models, tmp_path):
    record, expected = BAD_ITEMS[case]
    items = tmp_path / "items.jsonl"
    if record is not None:
        items.write_text(json.dumps(record) + "\n")
    output = tmp_path / "evaluation.json"
    result = subprocess.run(
        [sys.executable, "launch.py", "evaluate_recipe", f"model_path={tiny_hf_models['llama']}",
         f"evaluation.accuracy.task={items}", f"output_path={output}", "--yes"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr
    assert last.startswith(f"error: evaluate_recipe: {items}: {expected}") or (
        case == "missing" and last.startswith(f"error: evaluate_recipe: task={str(items)!r}: {expected}")), last
    assert not output.exists()


def test_log_likelihoods_match_transformers_cloze_and_letters_with_few_shot(tiny_hf_models, runtime_single, tmp_path):
    mmlu = tmp_path / "logic_test.csv"
    mmlu.write_text("Which is true?,a,b,c,d,C\nPick one.,x,y,z,w,A\nAnd now?,1,2,3,4,D\n")
    with pytest.raises(TaskDataError, match="num_fewshot=3: subject 'logic' has 3 items in .*logic_test.csv, 4 needed"):
        task_items(AccuracyConfig(task=str(mmlu), num_fewshot=3))
    loaded = load_model(tiny_hf_models["llama"])
    tokenizer = load_tokenizer(loaded.hf_dir)
    for config in (AccuracyConfig(num_items=6, num_fewshot=2), AccuracyConfig(task=str(mmlu), num_fewshot=1)):
        items, examples = task_items(config)
        ours, _ = choice_log_likelihoods(loaded.model, tokenizer, items, examples, max_length=256, micro_batch_size=3)
        expected = _hf_choice_log_likelihoods(tiny_hf_models["llama"], items, examples)
        assert torch.tensor(ours).sub(torch.tensor(expected)).abs().max().item() < 1e-3
    # accuracy from the oracle's scores equals the stage's
    config = AccuracyConfig(num_items=12)
    items, examples = task_items(config)
    result = evaluate_multiple_choice(loaded.model, tokenizer, config, max_length=256)
    expected = _hf_choice_log_likelihoods(tiny_hf_models["llama"], items, examples)
    hits = [max(range(4), key=lambda k: scores[k]) == item.answer for item, scores in zip(items, expected)]
    assert result.items == 12 and result.accuracy == sum(hits) / 12
    assert result.ci95[0] <= result.accuracy <= result.ci95[1]


def test_lm_eval_adapter_equals_lm_eval_hf_backend_and_our_multiple_choice(tiny_hf_models, runtime_single, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nemo_optim.accuracy.lm_eval_adapter import NemoOptimLM

    items = embedded_cloze_items()[:16]
    data = _write_lm_eval_task(tmp_path / "tasks", items)
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_hf_models['llama']},dtype=float32",
                                 tasks=["tiny_cloze"], task_manager=manager, device="cpu", batch_size=4,
                                 log_samples=True)
    loaded = load_model(tiny_hf_models["llama"])
    tokenizer = load_tokenizer(loaded.hf_dir)
    ours = lm_eval.simple_evaluate(model=NemoOptimLM(loaded.model, tokenizer), tasks=["tiny_cloze"],
                                   task_manager=manager, log_samples=True)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_cloze"][metric] == hf["results"]["tiny_cloze"][metric]
    ours_ll = [r[0][0] for s in ours["samples"]["tiny_cloze"] for r in s["resps"]]
    hf_ll = [r[0][0] for s in hf["samples"]["tiny_cloze"] for r in s["resps"]]
    assert len(ours_ll) == 64 and max(abs(a - b) for a, b in zip(ours_ll, hf_ll)) < 1e-3
    # nemo-optim's own multiple-choice scorer on the same file agrees with lm-eval
    result = evaluate_multiple_choice(loaded.model, tokenizer, AccuracyConfig(task=str(data)), max_length=256)
    assert (result.accuracy, result.accuracy_norm) == (hf["results"]["tiny_cloze"]["acc,none"],
                                                       hf["results"]["tiny_cloze"]["acc_norm,none"])


def test_lm_eval_generate_until_and_rolling_match_transformers(tiny_hf_models, runtime_single):
    from lm_eval.api.instance import Instance

    from nemo_optim.accuracy.lm_eval_adapter import NemoOptimLM

    hf_dir = tiny_hf_models["llama"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    loaded = load_model(hf_dir)
    lm = NemoOptimLM(loaded.model, load_tokenizer(loaded.hf_dir), batch_size=2)
    prompts = ["The return value is", "A module object has a namespace", "Changed in version"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 10}), 0) for p in prompts]
    for prompt, text in zip(prompts, lm.generate_until(requests)):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
        assert text == expected
    # rolling log-likelihood of a text longer than the window (256): lm-eval's disjoint windows
    text = " ".join(split_documents(DataConfig(), "validation")[:3])
    (ours,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    from lm_eval import utils

    ids = tokenizer.encode(text)
    assert len(ids) > 300
    expected = 0.0
    for window in utils.get_rolling_token_windows(ids, tokenizer.eos_token_id, max_seq_len=256, context_len=1):
        context, predicted = utils.make_disjoint_window(window)
        sequence = torch.tensor([context + predicted])
        with torch.no_grad():
            log_probs = torch.log_softmax(hf(sequence).logits[0, :-1], dim=-1)
        expected += log_probs[-len(predicted):].gather(-1, torch.tensor(predicted)[:, None]).sum().item()
    assert abs(ours - expected) < 1e-3 * len(ids) / 256 + 1e-3


def test_evaluate_stage_records_accuracy_and_lm_eval_and_report_shows_them(tiny_hf_models, tmp_path):
    from nemo_optim.evaluation import EvaluationConfig, LmEvalConfig
    from nemo_optim.stages.evaluate import evaluate
    from nemo_optim.report import report

    items = embedded_cloze_items()[:8]
    _write_lm_eval_task(tmp_path / "tasks", items)
    output = tmp_path / "evaluation.json"
    result = evaluate(
        model_path=str(tiny_hf_models["llama"]), output_path=str(output),
        evaluation=EvaluationConfig(data=DataConfig(seq_length=32), num_sequences=2,
                                    accuracy=AccuracyConfig(num_items=8),
                                    lm_eval=LmEvalConfig(tasks=["tiny_cloze"], include_path=str(tmp_path / "tasks"))),
    )
    saved = json.loads(output.read_text())
    assert saved["task_accuracy"]["items"] == 8 and saved["task_accuracy"]["task"] == "embedded:stdlib-cloze"
    # the same 8 items through lm-eval and through nemo-optim's scorer
    assert saved["lm_eval"]["tiny_cloze"]["acc,none"] == result.task_accuracy["accuracy"]
    assert saved["lm_eval"]["tiny_cloze"]["acc_norm,none"] == result.task_accuracy["accuracy_norm"]
    markdown = report(output_dir=str(tmp_path / "report"), models={"tiny": str(tiny_hf_models["llama"])},
                      evaluations={"tiny": str(output)}).read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model"))
    assert "| accuracy | accuracy 95% CI |" in header
    assert "`embedded:stdlib-cloze`, 8 items" in markdown


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_scores_and_generation_at_tp_and_pp_equal_one_process(tp, pp, tiny_hf_models, tmp_path):
    from nemo_optim import runtime
    from nemo_optim.accuracy.scoring import greedy_generate

    items_file = tmp_path / "items.jsonl"
    items_file.write_text("".join(json.dumps({"query": i.question, "choices": list(i.choices), "gold": i.answer}) + "\n"
                                  for i in embedded_cloze_items()[:7]))
    with runtime.parallel_runtime():
        loaded = load_model(tiny_hf_models["llama"])
        tokenizer = load_tokenizer(loaded.hf_dir)
        items, examples = task_items(AccuracyConfig(task=str(items_file), num_fewshot=1))
        expected, _ = choice_log_likelihoods(loaded.model, tokenizer, items, examples, max_length=256,
                                             micro_batch_size=3)
        prompts = [tokenizer.encode(item.question) for item in items[:3]]
        generated = greedy_generate(loaded.model, prompts, max_new_tokens=6, max_length=256, eos_id=None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(REPO / "tests" / "distributed" / "accuracy_worker.py"), "--model", str(tiny_hf_models["llama"]),
               "--task", str(items_file), "--output", str(tmp_path / "out.pt"), "--tp", str(tp), "--pp", str(pp)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.tensor(out["scores"]).sub(torch.tensor(expected)).abs().max().item() < 1e-3
    assert out["generated"] == generated


@pytest.mark.slow
def test_smollm2_log_likelihoods_match_transformers(runtime_single):
    """SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to fp32) against transformers on the same weights."""
    loaded = load_model(SMOLLM2)
    tokenizer = load_tokenizer(loaded.hf_dir)
    items, examples = task_items(AccuracyConfig(num_items=6))
    ours, _ = choice_log_likelihoods(loaded.model, tokenizer, items, examples, max_length=2048)
    expected = _hf_choice_log_likelihoods(loaded.hf_dir, items, defaultdict(list), max_length=2048)
    assert torch.tensor(ours).sub(torch.tensor(expected)).abs().max().item() < 1e-3


def test_cli_override_turns_on_an_optional_section_from_its_defaults():
    import fiddle as fdl

    from nemo_optim_recipes.convert import evaluate_recipe
    from nemo_optim_recipes.launching import apply_overrides

    partial = apply_overrides(evaluate_recipe(), ['evaluation.lm_eval.tasks=["tiny_cloze"]', "evaluation.accuracy=None",
                                                  "evaluation.lm_eval.limit=4"])
    built = fdl.build(partial).keywords["evaluation"]
    assert built.accuracy is None
    assert (built.lm_eval.tasks, built.lm_eval.limit, built.lm_eval.batch_size) == (["tiny_cloze"], 4, 8)
