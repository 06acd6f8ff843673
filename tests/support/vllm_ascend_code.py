"""vllm-ascend 0.23's own code in a CPU gloo rank: its op registrations, its config and its forward context.

Its source comes from the sdist (devtools/sources.py, ``make ascend-src``); torch_npu is the test stand-in
(tests/standins/npu), importable only, never ``install()``ed: no "npu" device, the ranks are CPU ones. Two
things of vllm-ascend cannot run here, and only these are worked around:

- on vLLM 0.31 (not the vLLM it was built for), ``vllm_ascend/ops/__init__.py`` imports its fused-MoE layer,
  which imports a vLLM ``FusedMoE`` that 0.31 no longer has: the ``vllm_ascend.ops`` package is entered without
  running that file (every module in it is the real one), and the one MoE name its forward context reads,
  ``moe_comm_method.get_moe_comm_method``, answers None (a dense model has no MoE method). On its own vLLM
  (0.23, ``make test-ascend023``) the package imports as it is, with the torch_npu stand-in's ``torch.npu``;
- its ops register kernels for PrivateUse1 (NPU) only: the same Python functions of its
  ``register_custom_ops`` / ``linear`` are registered as their CPU kernels, so CPU tensors run vllm-ascend's
  own code.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
import types

from devtools import sources
from devtools.vllm_cpu import rank_setup
from support.npu_runs import STANDIN_DIR

SOURCE = sources.VLLM_ASCEND.folder
OPS = "vllm_ascend.ops"
# op of torch.ops.vllm -> (vllm-ascend module, the function it registers as that op's NPU kernel)
KERNELS = {
    "maybe_pad_and_reduce": (f"{OPS}.register_custom_ops", "_maybe_pad_and_reduce_impl"),
    "maybe_all_gather_and_maybe_unpad": (f"{OPS}.register_custom_ops", "_maybe_all_gather_and_maybe_unpad_impl"),
    "maybe_chunk_residual": (f"{OPS}.register_custom_ops", "_maybe_chunk_residual_impl"),
    "quantize": (f"{OPS}.register_custom_ops", "_quantize_impl"),
    "unquantized_gemm": (f"{OPS}.linear", "unquantized_gemm"),
}
# vllm-ascend's switch for FlashComm v1 (its additional_config key), and its own fusion passes off: their
# patterns need torchair and NPU kernels.
ADDITIONAL_CONFIG = {"enable_flashcomm1": True, "ascend_compilation_config": {flag: False for flag in (
    "fuse_norm_quant", "fuse_qknorm_rope", "fuse_allreduce_rms", "fuse_muls_add")}}


def setup():
    """run_ranks ``setup``: vllm-ascend's source and the torch_npu stand-in importable, vLLM's rank setup."""
    if not (SOURCE / "vllm_ascend" / "__init__.py").is_file():
        raise RuntimeError(f"vllm-ascend's source is not in {SOURCE}: run `make ascend-src` "
                           "(python -m devtools.sources)")
    sys.path[:0] = [str(SOURCE), STANDIN_DIR]
    rank_setup()


def load_ops() -> str:
    """vllm-ascend's op registrations (torch.ops.vllm.*), with its kernels for CPU tensors too. Idempotent.

    Returns how its ``vllm_ascend.ops`` package was entered: "imported" (its own ``__init__``, as on the vLLM
    it was built for), or "entered" (without it: the vLLM 0.31 workaround of the module docstring).
    """
    import torch

    import vllm_ascend

    if OPS not in sys.modules:
        try:
            importlib.import_module(OPS)
        except ImportError as exc:
            if "FusedMoE" not in str(exc):
                raise
            _enter_ops_without_its_init(vllm_ascend)
    for op, (module, function) in KERNELS.items():
        kernel = getattr(importlib.import_module(module), function)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vllm::{op}", "CPU"):
            torch.library.impl(f"vllm::{op}", "CPU")(kernel)
    return "entered" if getattr(sys.modules[OPS], "__file__", None) is None else "imported"


def _enter_ops_without_its_init(vllm_ascend) -> None:
    """vLLM 0.31 lacks the ``FusedMoE`` vllm-ascend 0.23's ops package imports: enter the package without its
    ``__init__``; the one MoE name the forward context reads answers None (a dense model has no MoE method)."""
    for name in [name for name in sys.modules if name.startswith(OPS + ".")]:
        del sys.modules[name]  # what the failed import left half-done
    package = types.ModuleType(OPS)
    package.__path__ = [str(SOURCE / "vllm_ascend" / "ops")]
    sys.modules[OPS] = vllm_ascend.ops = package
    moe = types.ModuleType(f"{OPS}.fused_moe")
    moe.__path__ = []
    comm_method = types.ModuleType(f"{OPS}.fused_moe.moe_comm_method")
    comm_method.get_moe_comm_method = lambda moe_comm_type: None
    sys.modules[moe.__name__], sys.modules[comm_method.__name__] = moe, comm_method


def model_config():
    """vLLM's ModelConfig of a tiny random Llama (vllm-ascend's config and forward context read the model).
    Written by rank 0 (transformers saves on the main process only) for every rank."""
    import torch.distributed as dist
    from vllm.config import ModelConfig

    from devtools.engine import write_tiny_llama

    path = [write_tiny_llama(tempfile.mkdtemp(prefix="fcpass-ascend-model-")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return ModelConfig(model=path[0])


def init_config(vllm_config) -> None:
    """What vllm-ascend's platform does with the config at startup (its ascend config, read by its ops)."""
    from vllm_ascend.ascend_config import init_ascend_config

    init_ascend_config(vllm_config)


@contextlib.contextmanager
def forward(vllm_config, num_tokens: int, dp_padded_length: int | None = None):
    """vllm-ascend's forward context of a ``num_tokens`` forward (its own ``set_ascend_forward_context``: a
    dense model turns FlashComm v1 on above 1000 tokens, with ``pad_size`` up to a multiple of the TP size).

    ``dp_padded_length``: under DP, vllm-ascend pads every DP rank's tokens to the largest count across them,
    rounded up to the TP size (``pad_size = padded_length - num_tokens``); set here as it sets it, since the
    ranks of a test form one TP group and no DP group."""
    from vllm_ascend.ascend_forward_context import _EXTRA_CTX, set_ascend_forward_context

    with set_ascend_forward_context(None, vllm_config, num_tokens=num_tokens):
        if dp_padded_length is not None and _EXTRA_CTX.flash_comm_v1_enabled:
            _EXTRA_CTX.padded_length = dp_padded_length
            _EXTRA_CTX.pad_size = dp_padded_length - num_tokens
        yield _EXTRA_CTX
