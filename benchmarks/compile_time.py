"""Cold torch.compile time of vLLM Llama (TP=2, gloo) with and without fcpass, measured in one rank.

Rank side of benchmarks/pass_cost.py: one call = one compile in a fresh
process (run_ranks spawns one per call), with an empty Inductor cache dir of
its own, so nothing compiled earlier (in memory or on disk) is reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

# variant: (vLLM's SequenceParallelismPass on?, fcpass PassConfig fields or None for no fcpass)
COMPILE_VARIANTS = {
    "plain": (False, None),
    "fcpass_sp+fusion": (False, {"sequence_parallel": True, "sequence_parallel_threshold_tokens": 0}),
    "vllm_sp": (True, None),
    "vllm_sp+fcpass_fusion": (True, {}),
}
# What each fcpass variant is compared with: the same compile without fcpass.
BASELINES = {"fcpass_sp+fusion": "plain", "vllm_sp+fcpass_fusion": "vllm_sp"}
# Dynamo's timer around a whole frame compile (tracing, AOT autograd, Inductor incl. post-grad passes, codegen).
FRAME_COMPILE_METRIC = "_compile.compile_inner"
# Parts of it reported alongside: the harness's post-grad custom pass (vLLM SP + fcpass + vLLM's tail passes),
# and the C++ compiler (most of a cold CPU compile; summed over parallel compile workers).
PART_METRICS = {"custom_post_pass_s": "pass.post_grad_passes.post_grad_custom_post_pass",
                "cpp_compile_s": "compile_file"}


def compile_once(rank: int, world_size: int, variant: str, layers: int, tokens: int) -> dict:
    """Compile and run ``variant`` once, cold; Dynamo's compile-time metrics (s) and the run's sanity facts."""
    import torch._dynamo.utils

    import fcpass
    import fcpass.vllm
    from devtools.vllm_cpu import compile_and_run

    vllm_sp, fields = COMPILE_VARIANTS[variant]
    config = None if fields is None else fcpass.vllm.compilation_config(fcpass.PassConfig(**fields))
    cache_dir = tempfile.mkdtemp(prefix=f"fcpass-compile-{variant}-r{rank}-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # Inductor reads it on every use
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # the harness bypasses vLLM's backend; off in case
    try:
        start = time.perf_counter()
        r = compile_and_run(rank, world_size, "llama", (tokens,), vllm_sp=vllm_sp, compilation_config=config,
                            layers=layers)
        wall_s = time.perf_counter() - start
        metrics = {name: sum(times) for name, times in torch._dynamo.utils.compilation_time_metrics.items()}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if FRAME_COMPILE_METRIC not in metrics:
        raise RuntimeError(f"Dynamo recorded no {FRAME_COMPILE_METRIC!r}; it has {sorted(metrics)}")
    report = r["extra_pass_report"]
    return {
        "compile_s": metrics[FRAME_COMPILE_METRIC],
        **{part: metrics.get(metric, 0.0) for part, metric in PART_METRICS.items()},
        "wall_s": wall_s,  # model build + compile + first call + eager reference
        "metrics_s": metrics,
        "compilations": r["compilations"],
        "max_rel_error": max(r["max_rel_error"]),
        "matched": report.matched() if report is not None else {},
    }
