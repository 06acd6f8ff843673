"""Makes vLLM load its AVX2 kernel library (``_C_AVX2``: no shm collectives) on a CPU with AVX-512.

vLLM's ``CpuPlatform.import_kernels`` picks the library by
``torch.cpu._is_avx512_supported()``; while it runs, that check answers
False here, so the process runs vLLM as on an AVX2-only CPU (its all_reduce
then goes through gloo). Only vLLM's own check is changed: Inductor picks
its vector ISA by the same function, and code generated for AVX2 but cached
under this machine's key would be served to other processes (wrong numbers).
Python imports this module at startup from the first ``sitecustomize`` on
its path: tests and benchmarks put this folder on ``PYTHONPATH`` of the processes they
start (devtools/kernels.py).
"""

import importlib.abc
import importlib.util
import sys

_PLATFORM_MODULE = "vllm.platforms.cpu"


def _without_avx512(import_kernels):
    def import_avx2_kernels(cls):
        import torch.cpu

        check = torch.cpu._is_avx512_supported
        torch.cpu._is_avx512_supported = lambda: False
        try:
            return import_kernels(cls)
        finally:
            torch.cpu._is_avx512_supported = check

    return classmethod(import_avx2_kernels)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps ``CpuPlatform.import_kernels`` right after vLLM's CPU platform module is executed."""

    def find_spec(self, name, path, target=None):
        if name != _PLATFORM_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            platform = module.CpuPlatform
            platform.import_kernels = _without_avx512(platform.import_kernels.__func__)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
