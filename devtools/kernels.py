"""Which of vLLM's CPU kernel libraries a process loads, and how to make a new process load the AVX2 one.

vLLM loads ``_C`` (AVX-512 with bf16), ``_C_AVX512`` or ``_C_AVX2`` by the
CPU it runs on; the AVX-512 builds carry shared-memory collectives, so
there the engine's all_reduce is ``_C.shm_allreduce`` ("shm" in fcpass's
reports) and elsewhere ``_c10d_functional.all_reduce`` over gloo. Tests and
benchmarks run both engines on any x86 CPU: the one vLLM picks, and the
AVX2 build, forced with :func:`avx2_env`.
"""

from __future__ import annotations

import os

AVX2_SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "avx2_kernels")


def avx2_env() -> dict[str, str]:
    """Environment additions that make a new process load vLLM's AVX2 kernels (devtools/avx2_kernels)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": AVX2_SITE_DIR + (os.pathsep + path if path else "")}


def all_reduce_kernel() -> str:
    """The CPU engine's all_reduce in this process, as the pass reports its form: "shm" where the kernel
    library vLLM loaded has its shared-memory collectives (AVX-512 builds), else "c10d_functional"."""
    import torch

    return "shm" if hasattr(torch.ops._C, "shm_allreduce") else "c10d_functional"
