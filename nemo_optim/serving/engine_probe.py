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
        kernel = (getattr(scheme, "kernel", None) or getattr(scheme, "fp8_linear", None)
                  or getattr(method, "kernel", None))
        found.setdefault(name.rsplit(".", 1)[-1], " / ".join(
            type(x).__name__ for x in (method, scheme, kernel) if x is not None))
    return found


def time_linears(model, repeats: int = 200) -> dict:
    """Microseconds per call of the first decoder layer's linears at decode shape (one token), as
    the engine runs them (its quantized kernels, its threads), with the bytes each reads: what
    a per-token decode step spends in its matrix multiplies."""
    import time

    import torch

    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    dtype = next(m for n, m in model.named_modules() if n.endswith("embed_tokens")).weight.dtype
    timings = {}
    for name, module in layer.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(module, "input_size_per_partition"):
            continue
        x = torch.randn(1, module.input_size_per_partition, dtype=dtype)
        params = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        with torch.no_grad():
            for _ in range(10):
                module(x)
            start = time.perf_counter()
            for _ in range(repeats):
                module(x)
        seconds = (time.perf_counter() - start) / repeats
        shape = [module.input_size_per_partition, module.output_size_per_partition]
        timings[name.rsplit(".", 1)[-1]] = {"us": seconds * 1e6, "bytes": params, "gb_per_s": params / seconds / 1e9,
                                            "shape": shape}
    return timings
