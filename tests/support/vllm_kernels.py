"""The all_reduce form tests expect from the kernel library vLLM loads in this process.

What the libraries are and how a new process is made to load the AVX2 one:
devtools/kernels.py (:func:`avx2_env` is re-exported here for the tests).
"""

from __future__ import annotations

from devtools.kernels import LIBRARIES, all_reduce_kernel, avx2_env, forceable_builds, forced_env, loaded_library

__all__ = ["LIBRARIES", "all_reduce_form", "avx2_env", "forceable_builds", "forced_env", "loaded_library"]


def all_reduce_form() -> str:
    """The report form of the CPU engine's all_reduce in this process (loading vLLM's kernels if need be)."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return all_reduce_kernel()
