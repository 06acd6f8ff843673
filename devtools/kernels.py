"""Which of vLLM's CPU kernel libraries a process loads, and how to make a new process load another one.

vLLM loads ``_C`` (AVX-512 with bf16), ``_C_AVX512`` or ``_C_AVX2`` by the
CPU it runs on; the AVX-512 builds carry shared-memory collectives, so
there the engine's all_reduce is ``_C.shm_allreduce`` ("shm" in fcpass's
reports) and elsewhere ``_c10d_functional.all_reduce`` over gloo. Tests and
benchmarks run the builds on any x86 CPU: the one vLLM picks, the AVX2
build, forced with :func:`avx2_env`, and on a CPU with AVX-512 and bf16 the
AVX-512 build without bf16 too (:func:`forced_env`, :func:`forceable_builds`).
"""

from __future__ import annotations

import os

FORCED_SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forced_kernels")


def forced_env(build: str) -> dict[str, str]:
    """Environment additions that make a new process load vLLM's ``build`` kernels ("avx2", "avx512": AVX-512
    without bf16), through devtools/forced_kernels."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": FORCED_SITE_DIR + (os.pathsep + path if path else ""), "FCPASS_VLLM_KERNELS": build}


def avx2_env() -> dict[str, str]:
    """Environment additions that make a new process load vLLM's AVX2 kernels."""
    return forced_env("avx2")


def loaded_build() -> str:
    """The build vLLM loads on this CPU: "avx512_bf16" (``_C``), "avx512" or "avx2"."""
    import torch.cpu

    if not torch.cpu._is_avx512_supported():
        return "avx2"
    return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"


def forceable_builds() -> list[str]:
    """The builds other than the loaded one that this CPU can run, by :func:`forced_env`."""
    return {"avx512_bf16": ["avx512", "avx2"], "avx512": ["avx2"], "avx2": []}[loaded_build()]


def all_reduce_kernel() -> str:
    """The CPU engine's all_reduce in this process, as the pass reports its form: "shm" where the kernel
    library vLLM loaded has its shared-memory collectives (AVX-512 builds), else "c10d_functional"."""
    import torch

    return "shm" if hasattr(torch.ops._C, "shm_allreduce") else "c10d_functional"


# The library each build is, as this process's memory map names it.
LIBRARIES = {"avx512_bf16": "_C", "avx512": "_C_AVX512", "avx2": "_C_AVX2"}


def loaded_library() -> str | None:
    """Which of vLLM's kernel libraries this process has loaded ("_C", "_C_AVX512", "_C_AVX2"), read from its
    memory map (vLLM imports ``_C_AVX512`` / ``_C_AVX2`` under the module name ``_C``); None: none yet."""
    import re

    with open("/proc/self/maps") as maps:
        found = {m.group(1) for m in re.finditer(r"/vllm/(_C(?:_AVX512|_AVX2)?)\.[^/\s]*\.so", maps.read())}
    return next((lib for lib in ("_C_AVX2", "_C_AVX512", "_C") if lib in found), None)
