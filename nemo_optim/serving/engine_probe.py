"""Functions vLLM runs inside its worker process (`LLM.apply_model`) for engine_worker.py. They
are imported as a top-level module from this directory (the worker script's own, which vLLM's
spawned processes also have on their path), so that they pickle by reference."""


def linear_methods(model) -> dict:
    """kind of linear layer (qkv_proj, down_proj, ...) -> vLLM's method / scheme / kernel classes."""
    found = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or type(method).__name__ == "UnquantizedEmbeddingMethod":
            continue
        scheme = getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None) or getattr(scheme, "fp8_linear", None) or getattr(method, "kernel", None)
        found.setdefault(name.rsplit(".", 1)[-1], " / ".join(
            type(x).__name__ for x in (method, scheme, kernel) if x is not None))
    return found
