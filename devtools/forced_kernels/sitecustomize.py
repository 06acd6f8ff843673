"""Makes vLLM load another of its CPU kernel libraries than this CPU's: ``FCPASS_VLLM_KERNELS`` says which.

vLLM's ``CpuPlatform.import_kernels`` picks ``_C`` (AVX-512 with bf16),
``_C_AVX512`` or ``_C_AVX2`` by ``torch.cpu._is_avx512_supported()`` and
``torch.cpu._is_avx512_bf16_supported()``; while it runs, those checks
answer as the CPU of the asked build would ("avx2": no AVX-512, so no shm
collectives and the all_reduce goes through gloo; "avx512": AVX-512 without
bf16), so the process runs vLLM as on that CPU. Only vLLM's own check is
changed: Inductor picks its vector ISA by the same functions, and code
generated for another ISA but cached under this machine's key would be
served to other processes (wrong numbers). A build needs the instructions it
was built for: AVX-512 can be forced only on a CPU that has it. Python
imports this module at startup from the first ``sitecustomize`` on its path:
tests and benchmarks put this folder on ``PYTHONPATH`` of the processes they
start (devtools/kernels.py).
"""

import importlib.abc
import importlib.util
import os
import sys

_PLATFORM_MODULE = "vllm.platforms.cpu"
# build -> (what _is_avx512_supported, _is_avx512_bf16_supported answer while vLLM picks its library)
_ANSWERS = {"avx2": (False, False), "avx512": (True, False)}


def _as_on(build, import_kernels):
    avx512, bf16 = _ANSWERS[build]

    def import_forced_kernels(cls):
        import torch.cpu

        checks = torch.cpu._is_avx512_supported, torch.cpu._is_avx512_bf16_supported
        torch.cpu._is_avx512_supported = lambda: avx512
        torch.cpu._is_avx512_bf16_supported = lambda: bf16
        try:
            return import_kernels(cls)
        finally:
            torch.cpu._is_avx512_supported, torch.cpu._is_avx512_bf16_supported = checks

    return classmethod(import_forced_kernels)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``CpuPlatform.import_kernels`` right after vLLM's CPU platform module is executed."""

    def __init__(self, build):
        self.build = build

    def find_spec(self, name, path, target=None):
        if name != _PLATFORM_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            platform = module.CpuPlatform
            platform.import_kernels = _as_on(self.build, platform.import_kernels.__func__)

        spec.loader.exec_module = exec_module
        return spec


_build = os.environ.get("FCPASS_VLLM_KERNELS", "")
if _build:
    if _build not in _ANSWERS:
        raise SystemExit(f"FCPASS_VLLM_KERNELS={_build!r}: known builds are {', '.join(_ANSWERS)}")
    sys.meta_path.insert(0, _PatchOnImport(_build))
