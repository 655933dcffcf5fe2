"""Runs models in vLLM and writes what the engine produced as JSON. It runs in the engine's own
venv (`make engine-venv`, .venv-vllm) as a script: it imports vLLM and the standard library only,
never nemo_optim.

    .venv-vllm/bin/python nemo_optim/serving/engine_worker.py REQUEST.json RESULT.json

REQUEST: {"jobs": [{"name", "model", "dtype", "max_model_len", "prompts": [[token ids]],
"max_tokens", "prompt_logprobs" (top-k per prompt position, 0: none), "speculative" (vLLM's
speculative_config or null), "timing": {"decode_tokens", "decode_prompts", "repeats"} or null,
"profile_linears" (time the first layer's linears at decode shape)}]}.
Each job's engine is built, used and shut down before the next one starts; a job that fails
records its error line and the others still run.
"""

import gc
import json
import os
import sys
import time
import traceback

JOB_MARK = "=== nemo-optim engine job: "  # (the caller finds each job's part of the log by it)


def _rss_bytes() -> int:
    """Resident memory of this process and its children (vLLM's engine core and worker)."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)] if p.is_running())


def _linear_methods(llm) -> dict:
    import engine_probe  # (this script's directory is on the path: see engine_probe)

    try:
        return llm.apply_model(engine_probe.linear_methods)[0]
    except Exception as error:  # the names are a report, not a result: say why they are missing
        return {"unavailable": f"{type(error).__name__}: {error}"}


def _spec_metrics(llm) -> dict:
    """vLLM's speculative-decoding counters (cumulative over this engine's requests): drafts,
    draft tokens, accepted tokens, and accepted tokens per draft position."""
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            value = getattr(metric, "value", None)
            counters[metric.name] = value if value is not None else list(getattr(metric, "values", []))
    return counters


def _generate(llm, params_cls, job: dict) -> dict:
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    k = job.get("prompt_logprobs") or None
    params = params_cls(temperature=0.0, max_tokens=job.get("max_tokens", 16), prompt_logprobs=k,
                        ignore_eos=job.get("ignore_eos", False), seed=0, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    if k:
        result["prompt_logprobs"] = [
            [None if pos is None else {str(t): lp.logprob for t, lp in pos.items()} for pos in o.prompt_logprobs]
            for o in outputs]
    return result


def _timing(llm, params_cls, job: dict) -> dict:
    """Prefill: the prompts with one new token each; decode: one prompt at a time to
    `decode_tokens` new tokens (EOS ignored), minus its time to first token."""
    timing = job["timing"]
    repeats = timing.get("repeats", 3)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    one = params_cls(temperature=0.0, max_tokens=1, ignore_eos=True)
    many = params_cls(temperature=0.0, max_tokens=timing["decode_tokens"], ignore_eos=True)
    llm.generate(prompts[:1], one, use_tqdm=False)  # warm-up
    prefill, ttft, decode = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        prefill.append(sum(len(p["prompt_token_ids"]) for p in prompts) / (time.perf_counter() - start))
        for prompt in prompts[:timing.get("decode_prompts", 1)]:
            start = time.perf_counter()
            llm.generate([prompt], one, use_tqdm=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = llm.generate([prompt], many, use_tqdm=False)
            total = time.perf_counter() - start
            ttft.append(first)
            decode.append((len(out[0].outputs[0].token_ids) - 1) / max(total - first, 1e-9))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"prefill_tokens_per_s": median(prefill), "decode_tokens_per_s": median(decode),
            "ttft_s": median(ttft), "runs": {"prefill": prefill, "decode": decode, "ttft": ttft}}


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    kwargs = dict(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=job.get("max_model_len"),
                  enforce_eager=True, seed=0, max_num_seqs=job.get("max_num_seqs", 8),
                  max_logprobs=-1 if job.get("prompt_logprobs") == -1 else max(20, job.get("prompt_logprobs") or 0),
                  disable_log_stats=False)
    if job.get("speculative"):
        kwargs["speculative_config"] = job["speculative"]
    llm = LLM(**kwargs)
    result = {"startup_s": time.perf_counter() - start, "rss_bytes": _rss_bytes(),
              "quantization": llm.llm_engine.vllm_config.model_config.quantization,
              "linear_methods": _linear_methods(llm)}
    try:
        if job.get("prompts") and not job.get("timing_only"):
            result.update(_generate(llm, SamplingParams, job))
        if job.get("timing"):
            result["timing"] = _timing(llm, SamplingParams, job)
        if job.get("speculative"):
            result["spec_decode"] = _spec_metrics(llm)
        if job.get("profile_linears"):
            import engine_probe

            result["linears"] = llm.apply_model(engine_probe.time_linears)[0]
    finally:
        del llm
        gc.collect()
    return result


def main(request_path: str, result_path: str) -> None:
    jobs = json.loads(open(request_path).read())["jobs"]
    results = []
    for job in jobs:
        print(f"{JOB_MARK}{job['name']}", flush=True)
        try:
            results.append({"name": job["name"], **run_job(job)})
        except Exception as error:
            traceback.print_exc()
            lines = [line.strip() for line in str(error).splitlines()
                     if line.strip() and not line.strip().startswith("For further information")]
            line = lines[-1][:400] if lines else ""
            results.append({"name": job["name"], "error": f"{type(error).__name__}: {line}"})
        # each result is on disk as soon as it exists: a crash later loses only the rest
        with open(result_path + ".partial", "w") as out:
            json.dump({"results": results}, out)
    os.replace(result_path + ".partial", result_path)


if __name__ == "__main__":  # vLLM spawns its engine processes: the import must not run main
    main(sys.argv[1], sys.argv[2])
