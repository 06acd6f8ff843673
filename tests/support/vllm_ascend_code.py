"""vllm-ascend's own code in a CPU gloo rank: its op registrations, its config and its forward context.

The release built for the vLLM under test (0.23.0.post1 on vLLM 0.23, 0.30.0rc2 on vLLM 0.30: `make
test-ascend023` / `test-ascend030`), its source from the sdist (devtools/sources.py, ``make ascend-src``), imported
as it is; torch_npu is the test stand-in (tests/standins/npu), importable only, never ``install()``ed: no "npu"
device, the ranks are CPU ones. One thing of vllm-ascend cannot run here: its ops register kernels for
PrivateUse1 (NPU) only, so the same Python functions of its ``register_custom_ops`` / ``linear`` are registered
as their CPU kernels, and CPU tensors run vllm-ascend's own code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import tempfile

from devtools import sources
from devtools.vllm_cpu import rank_setup
from support.npu_runs import STANDIN_DIR

RELEASE = sources.vllm_ascend_for(importlib.metadata.version("vllm"))
SOURCE = RELEASE.folder
# vllm-ascend 0.23's padding collectives (maybe_pad_and_reduce, maybe_all_gather_and_maybe_unpad) are FlashComm
# v1's on vLLM's TP group, switched per forward (and its MoE's on the EP group with is_ep_comm=True); 0.30's are
# its MoE prepare/finalize's only, on the EP group, with neither a switch nor is_ep_comm (dense sequence
# parallelism moved to vLLM's model-level SP ops)
TP_FLASHCOMM = RELEASE.version.startswith("0.23.")
OPS = "vllm_ascend.ops"
# op of torch.ops.vllm -> (vllm-ascend module, the function it registers as that op's NPU kernel)
KERNELS = {
    "maybe_pad_and_reduce": (f"{OPS}.register_custom_ops", "_maybe_pad_and_reduce_impl"),
    "maybe_all_gather_and_maybe_unpad": (f"{OPS}.register_custom_ops", "_maybe_all_gather_and_maybe_unpad_impl"),
    "maybe_chunk_residual": (f"{OPS}.register_custom_ops", "_maybe_chunk_residual_impl"),
    "quantize": (f"{OPS}.register_custom_ops", "_quantize_impl"),
    "unquantized_gemm": (f"{OPS}.linear", "unquantized_gemm"),
    "matmul_and_reduce": (f"{OPS}.register_custom_ops", "_matmul_and_reduce_impl"),  # 0.23's SequenceRowParallelOp
}


def additional_config(**switches) -> dict:
    """vllm-ascend's additional_config: FlashComm v1 on (``enable_flashcomm1``), ``switches`` (its other keys),
    and its own fusion passes off (their patterns need torchair and NPU kernels): every ``fuse_*`` switch its
    release's ``AscendCompilationConfig`` has (0.23: ..., fuse_allreduce_rms; 0.30: ..., fuse_muls_add), read from
    its signature; 0.23 reads ``fuse_muls_add`` from its kwargs."""
    import inspect

    from vllm_ascend.ascend_config import AscendCompilationConfig

    own = [name for name in inspect.signature(AscendCompilationConfig).parameters if name.startswith("fuse_")]
    return {"enable_flashcomm1": True, **switches,
            "ascend_compilation_config": {flag: False for flag in sorted({*own, "fuse_muls_add"})}}


def setup():
    """run_ranks ``setup``: vllm-ascend's source and the torch_npu stand-in importable, vLLM's rank setup."""
    if not (SOURCE / "vllm_ascend" / "__init__.py").is_file():
        raise RuntimeError(f"vllm-ascend's source is not in {SOURCE}: run `make ascend-src` "
                           "(python -m devtools.sources)")
    sys.path[:0] = [str(SOURCE), STANDIN_DIR]
    rank_setup()


def compile_setup():
    """run_ranks ``setup`` for vllm-ascend's compile path: :func:`setup`, and vllm-ascend's pass key as the
    platform's (its platform cannot load here), so fcpass installs its pass where vllm-ascend's manager is."""
    setup()
    from vllm.platforms import current_platform

    from fcpass.vllm.compilation import ASCEND_PASS_KEY

    type(current_platform).pass_key = property(lambda self: ASCEND_PASS_KEY)


def compiled(model, pass_manager, compile_range):
    """``model`` through vllm-ascend's ``fusion_pass_compile`` with ``pass_manager`` (its GraphFusionPassManager,
    aot_autograd's compiler handing each pass an ``fx.GraphModule``, run eagerly after: no Inductor)."""
    import torch
    from vllm_ascend.compilation.compiler_interface import fusion_pass_compile

    from fcpass.vllm.compilation import ASCEND_PASS_KEY

    def backend(gm, example_inputs):
        assert isinstance(gm, torch.fx.GraphModule)
        compiled_graph, _ = fusion_pass_compile(gm, example_inputs, {ASCEND_PASS_KEY: pass_manager}, compile_range)
        return compiled_graph

    return torch.compile(model, backend=backend, dynamic=True, fullgraph=True)


@contextlib.contextmanager
def parallel_groups(vllm_config):
    """vllm-ascend's own groups (its fine-grained TP groups: mlp_tp, otp...), made as its worker makes them
    after vLLM's, and destroyed after."""
    from vllm_ascend.distributed import parallel_state

    parallel_state.init_ascend_model_parallel(vllm_config.parallel_config)
    try:
        yield parallel_state
    finally:
        parallel_state.destroy_ascend_model_parallel()


def load_ops() -> None:
    """vllm-ascend's op registrations (torch.ops.vllm.*), its ``vllm_ascend.ops`` package imported as it is, with
    its kernels for CPU tensors too. Idempotent."""
    import torch

    importlib.import_module(OPS)
    for op, (module, function) in KERNELS.items():
        kernel = getattr(importlib.import_module(module), function, None)  # importing it registers the op
        if kernel is None:
            continue  # not in this release (0.30 has no maybe_chunk_residual)
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vllm::{op}", "CPU"):
            torch.library.impl(f"vllm::{op}", "CPU")(kernel)


def pad_and_reduce(x, ep: bool = False):
    """The release's ``maybe_pad_and_reduce`` as its code calls it: its dense linear (0.23 only), or its MoE
    finalize (``ep``: 0.23 ``is_ep_comm=True``, 0.30 as it is)."""
    import torch

    return torch.ops.vllm.maybe_pad_and_reduce(x, *((True,) if ep and TP_FLASHCOMM else ()))


def all_gather_and_unpad(x, ep: bool = False):
    """The release's ``maybe_all_gather_and_maybe_unpad`` as its code calls it: its dense linear (0.23:
    ``label=True``), or its MoE prepare (``ep``: 0.23 ``(x, True, True)``, 0.30 ``(x)``)."""
    import torch

    if not TP_FLASHCOMM:
        return torch.ops.vllm.maybe_all_gather_and_maybe_unpad(x)
    return torch.ops.vllm.maybe_all_gather_and_maybe_unpad(x, True, *((True,) if ep else ()))


def flash_comm(context) -> tuple[bool, int]:
    """(the padding collectives communicate in this forward, the rows they pad): 0.23's FlashComm v1 switch and
    ``pad_size``; 0.30's always communicate (on the EP group, without DP padding here)."""
    if not TP_FLASHCOMM:
        return True, 0
    return bool(context.flash_comm_v1_enabled), int(context.pad_size or 0)


def model_config(architecture: str = "llama", layers: int | None = None, **config_fields):
    """vLLM's ModelConfig of a tiny random model, Llama or (``"qwen3_moe"``) a MoE one, for which vLLM creates
    the EP group (vllm-ascend's config and forward context read the model), of ``layers`` layers (else the
    checkpoints' default), ``config_fields`` added to its config.json (e.g. DeepSeek V3.2's ``index_topk``, which
    vllm-ascend reads as "the model has an indexer"). Written by rank 0 (transformers saves on the main process
    only) for every rank."""
    import json
    import os

    import torch.distributed as dist
    from vllm.config import ModelConfig

    from fcpass.checks import checkpoints

    folder = tempfile.mkdtemp(prefix=f"fcpass-ascend-{architecture}-")
    sizes = {"layers": layers} if layers else {}
    path = [checkpoints.write(folder, architecture, **sizes) if dist.get_rank() == 0 else None]
    if path[0] and config_fields:
        with open(os.path.join(path[0], "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path[0], "config.json"), "w") as f:
            json.dump({**config, **config_fields}, f)
    dist.broadcast_object_list(path, src=0)
    return ModelConfig(model=path[0])


def init_config(vllm_config) -> None:
    """What vllm-ascend does with the config at startup: its platform's ascend config (read by its ops), its
    model runner's ``is_vl_model(vllm_config)`` (its ``set_cos_and_sin`` asks it, which caches the answer; 0.23's
    ``SequenceColumnParallelOp`` reads the cache as it is traced, where working it out is untraceable) and, on
    0.23, its model runner's weight-prefetch method (read by its row-parallel linear ops)."""
    from vllm_ascend import utils
    from vllm_ascend.ascend_config import get_ascend_config, init_ascend_config

    init_ascend_config(vllm_config)
    # vllm-ascend caches what its one model is, per process; a rank here runs a model per body: forget the last
    for cached in ("_IS_MOE_MODEL", "_IS_DRAFTER_MOE_MODEL", "_IS_VL_MODEL", "_HAS_ROPE", "_ENABLE_SP"):
        if hasattr(utils, cached):
            setattr(utils, cached, None)
    for cached in ("enable_dsa_cp", "enable_dsa_cp_with_layer_shard"):  # functools caches of the same
        getattr(getattr(utils, cached, None), "cache_clear", lambda: None)()
    utils.is_vl_model(vllm_config)
    if hasattr(utils, "set_weight_prefetch_method"):
        utils.set_weight_prefetch_method(get_ascend_config().weight_prefetch_config)


def want_and_got(want_fn, got_fn, *args, eager_fn=None) -> dict:
    """``want_fn`` (compiled without fcpass) and ``got_fn`` (with it) on ``args``, each called once to compile it,
    then once counted: whether the outputs are the same bits, each call's collectives
    (``support.collective_calls``), got's max error relative to want, fcpass's decisions in got's call, got's
    rows; with ``eager_fn`` (the module, not compiled), whether want is its bits. Called inside the forward's
    contexts (vLLM's ``pass_context``, :func:`forward`)."""
    import torch

    import fcpass
    from support.collective_calls import collective_events, profiled

    outs, calls = {}, {}
    eager = None if eager_fn is None else eager_fn(*args)
    for label, fn in (("want", want_fn), ("got", got_fn)):
        fn(*args)  # compiles on a first call
        fcpass.reset_decision_counts()
        with profiled() as prof:
            outs[label] = fn(*args)
        calls[label] = collective_events(prof)
    want, got = outs["want"], outs["got"]
    return {"same_bits": torch.equal(got, want), "calls": calls,
            "error": ((got - want).abs().max() / want.abs().max()).item(),
            "decisions": sorted(fcpass.decision_counts()), "rows": got.shape[0],
            **({} if eager is None else {"eager_bits": torch.equal(eager, want)})}


@contextlib.contextmanager
def forward(vllm_config, num_tokens: int, dp_padded_length: int | None = None):
    """vllm-ascend's forward context of a ``num_tokens`` forward (its own ``set_ascend_forward_context``; on 0.23
    a dense model turns FlashComm v1 on above 1000 tokens, with ``pad_size`` up to a multiple of the TP size).

    ``dp_padded_length``: under DP, vllm-ascend pads every DP rank's tokens to the largest count across them,
    rounded up to the TP size (``pad_size = padded_length - num_tokens``); set here as it sets it, since the
    ranks of a test form one TP group and no DP group."""
    from vllm_ascend.ascend_forward_context import _EXTRA_CTX, set_ascend_forward_context

    with set_ascend_forward_context(None, vllm_config, num_tokens=num_tokens):
        if dp_padded_length is not None and TP_FLASHCOMM and _EXTRA_CTX.flash_comm_v1_enabled:
            _EXTRA_CTX.padded_length = dp_padded_length
            _EXTRA_CTX.pad_size = dp_padded_length - num_tokens
        yield _EXTRA_CTX
