"""Which of vLLM's CPU kernel libraries a process loads, and how to make one load the other.

vLLM loads ``_C`` (AVX-512 with bf16), ``_C_AVX512`` or ``_C_AVX2`` by the
CPU it runs on; the AVX-512 builds carry shared-memory collectives, so
there the engine's all_reduce is ``_C.shm_allreduce`` ("shm" in fcpass's
reports) and elsewhere ``_c10d_functional.all_reduce`` over gloo. Tests
take their expectations from what was loaded, and run the AVX2 build on
any x86 CPU with :func:`avx2_env`.
"""

from __future__ import annotations

import os

AVX2_SITE_DIR = os.path.join(os.path.dirname(__file__), "avx2_kernels")


def avx2_env() -> dict[str, str]:
    """Environment additions that make a new process load vLLM's AVX2 kernels (tests/support/avx2_kernels)."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": AVX2_SITE_DIR + (os.pathsep + path if path else "")}


def all_reduce_form() -> str:
    """The report form of the CPU engine's all_reduce in this process (loading vLLM's kernels if need be)."""
    from vllm.platforms import current_platform

    from devtools.engine import all_reduce_kernel

    current_platform.import_kernels()
    return all_reduce_kernel()
