"""lm-evaluation-harness on nemo-optim models: an `lm_eval` `LM` over a loaded megatron model,
so any lm-eval task (read from local files; nothing is downloaded) runs on native, HF, GGUF,
pruned, distilled and fake-quantized checkpoints at any TP/PP.

    pip install 'nemo-optim[eval]'
    from nemo_optim import runtime
    from nemo_optim.models.loader import load_model, load_tokenizer
    from nemo_optim.accuracy.lm_eval_adapter import NemoOptimLM, run_lm_eval
    with runtime.parallel_runtime():
        loaded = load_model("outputs/compress_smollm2/distilled")
        results = run_lm_eval(NemoOptimLM(loaded.model, load_tokenizer(loaded.hf_dir)), ["my_task"],
                              include_path="tasks/")

Model parallelism: every rank runs every request (lm-eval's own data-parallel sharding is
off: `rank` 0 of `world_size` 1 on each), so TP/PP ranks stay in step and all get the results.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM

from nemo_optim.accuracy.scoring import greedy_generate, score_continuations


class NemoOptimLM(TemplateLM):
    """lm-eval's `loglikelihood`, `loglikelihood_rolling` and `generate_until` on a megatron
    model built by nemo-optim (tokenization as lm-eval's Hugging Face backend)."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None, batch_size: int = 8,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # megatron's GPTModel keeps its position limit as an attribute
        self._max_length = max_length or getattr(model, "max_position_embeddings", 2048)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks

    # lm-eval's data-parallel sharding is off; see the module docstring
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        scores, _ = score_continuations(self.model, pairs, max_length=self.max_length,
                                        micro_batch_size=self.batch_size, pad_id=self.eot_token_id or 0,
                                        description="lm-eval loglikelihood")
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1,
            ):
                windows.append((None, *utils.make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences

        outputs = []
        for context, gen_kwargs in (request.args for request in requests):
            gen_kwargs: dict[str, Any] = dict(gen_kwargs)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            until = handle_stop_sequences(gen_kwargs.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
            if gen_kwargs.get("do_sample") or gen_kwargs.get("temperature", 0.0) > 0:
                raise ValueError(f"generate_until: sampling ({gen_kwargs}) is not supported; "
                                 f"nemo-optim decodes greedily.")
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]

            def stop(_row, new_ids, until=until):
                text = self.tokenizer.decode(new_ids)
                return any(term and term in text for term in until)

            new_ids = greedy_generate(self.model, [prompt], max_new_tokens=max_new, max_length=self.max_length,
                                      eos_id=self.eot_token_id, stop=stop, micro_batch_size=1,
                                      pad_id=self.eot_token_id or 0)[0]
            text = self.tokenizer.decode(new_ids)
            for term in until:
                if term:
                    text = text.split(term)[0]
            outputs.append(text)
        return outputs


def run_lm_eval(lm: NemoOptimLM, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | None = None) -> dict:
    """`lm_eval.simple_evaluate` on `lm`: task name -> {metric: value}. Tasks come from lm-eval's
    registry or YAML files under `include_path`; their data must be on this machine."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=TaskManager(include_path=include_path), log_samples=False,
    )
    return {name: {key: value for key, value in metrics.items() if key != "alias"}
            for name, metrics in output["results"].items()}
