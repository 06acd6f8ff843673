"""fcpass inside vllm-ascend 0.23's real compile path, on 2 gloo ranks with vLLM's TP group.

vllm-ascend's own code, unpacked from its sdist (devtools/sources.py; `make test` fetches it): vLLM's
``VllmBackend.configure_post_pass`` fills its ``GraphFusionPassManager`` (pass key ``graph_fusion_manager``),
and its ``fusion_pass_compile`` calls that manager as aot_autograd's compiler, handing every pass an
``fx.GraphModule`` and running the result eagerly (no Inductor after it), as vllm-ascend compiles a model
(../shared/ASCEND.md). torch_npu is the test stand-in (tests/standins/npu): vllm-ascend's utils import it
(importable only: no "npu" device is made, the ranks are CPU ones).
vllm-ascend's own fusion passes are switched off (``ascend_compilation_config``: their patterns need
torchair and NPU kernels), so fcpass is the manager's only pass. The matmuls and collectives are vLLM's:
``linear`` (rank-0-only bias on the row-parallel side), ``vllm.all_reduce`` / ``reduce_scatter`` /
``all_gather`` on the TP group; the fused ops run the generic backend (CPU tensors).
"""

import sys

import pytest
import torch

from devtools import sources
from devtools.vllm_cpu import rank_setup, vllm_tp
from support.multirank import shared
from support.npu_runs import STANDIN_DIR

THRESHOLD = 16
TOKENS = (8, 64, 63)  # at or below the threshold, above it, and a count world_size does not divide
ASCEND_FLAGS = {"ascend_compilation_config": {flag: False for flag in (
    "fuse_norm_quant", "fuse_qknorm_rope", "fuse_allreduce_rms", "fuse_muls_add")}}
HIDDEN, FFN = 32, 48


def ascend_compile_setup():
    """vllm-ascend's source and the torch_npu stand-in on the path, vllm-ascend's pass key as the platform's."""
    source = sources.VLLM_ASCEND.folder
    if not (source / "vllm_ascend" / "__init__.py").is_file():
        raise RuntimeError(f"vllm-ascend's source is not in {source}: run `make ascend-src` (python -m devtools.sources)")
    sys.path[:0] = [str(source), STANDIN_DIR]  # importable, not installed: no "npu" device, CPU ranks
    from vllm.platforms import current_platform

    from fcpass.vllm.compilation import ASCEND_PASS_KEY

    type(current_platform).pass_key = property(lambda self: ASCEND_PASS_KEY)
    rank_setup()


class RowThenColumn(torch.nn.Module):
    """Row-parallel linear (bias on rank 0 only, as vLLM's RowParallelLinear) -> all_reduce -> relu; and the
    sequence-parallel form: row-parallel -> reduce_scatter -> relu -> all_gather -> column-parallel linear."""

    def __init__(self, rank, world_size, sequence_parallel):
        super().__init__()
        g = torch.Generator().manual_seed(rank)
        self.sequence_parallel = sequence_parallel
        self.w_row = torch.nn.Parameter(torch.randn(HIDDEN, FFN, generator=g) / FFN ** 0.5)
        self.b_row = torch.nn.Parameter(torch.randn(HIDDEN, generator=g)) if rank == 0 else None
        self.w_col = torch.nn.Parameter(torch.randn(FFN, HIDDEN, generator=g) / HIDDEN ** 0.5)

    def forward(self, x):
        from vllm.distributed import (tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce,
                                      tensor_model_parallel_reduce_scatter)

        y = torch.nn.functional.linear(x, self.w_row, self.b_row)
        if not self.sequence_parallel:
            return torch.relu(tensor_model_parallel_all_reduce(y))
        shard = torch.relu(tensor_model_parallel_reduce_scatter(y, 0))
        return torch.nn.functional.linear(tensor_model_parallel_all_gather(shard, 0), self.w_col)


def run_in_vllm_ascend_compile(rank, world_size):
    import fcpass
    import fcpass.vllm as fcpass_vllm
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range
    from vllm_ascend.compilation.compiler_interface import fusion_pass_compile
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fcpass.vllm.compilation import ASCEND_PASS_KEY
    from support.vllm_backend import configure_post_pass

    config = fcpass_vllm.compilation_config({"threshold_tokens": THRESHOLD})
    results = {}
    with vllm_tp(rank, world_size, config, ASCEND_FLAGS) as (vllm_config, _), torch.no_grad():
        manager = configure_post_pass(vllm_config, GraphFusionPassManager(), ASCEND_PASS_KEY)
        results["passes"] = [type(p).__name__ for p in manager.passes]
        compile_range = Range(start=1, end=8192)

        def vllm_ascend_backend(gm, example_inputs):
            assert isinstance(gm, torch.fx.GraphModule)
            compiled, _ = fusion_pass_compile(gm, example_inputs, {ASCEND_PASS_KEY: manager}, compile_range)
            return compiled

        for name, sp in (("all_reduce", False), ("sequence_parallel", True)):
            torch._dynamo.reset()
            model = RowThenColumn(rank, world_size, sp)
            compiled = torch.compile(model, backend=vllm_ascend_backend, dynamic=True, fullgraph=True)
            runs = {}
            for tokens in TOKENS:
                if sp and tokens % world_size:
                    continue  # the model itself scatters without padding
                x = torch.randn(tokens, FFN, generator=torch.Generator().manual_seed(tokens))
                fcpass.reset_decision_counts()
                with pass_context(compile_range):
                    got = compiled(x)
                want = model(x)
                runs[tokens] = {"error": ((got - want).abs().max() / want.abs().max()).item(),
                                "decisions": sorted(fcpass.decision_counts())}
            results[name] = {"runs": runs, "matched": manager.passes[-1].matched}
    return results


ASCEND_COMPILE = shared(run_in_vllm_ascend_compile, setup=ascend_compile_setup, timeout=300)


def test_vllm_registers_the_pass_in_vllm_ascends_real_manager():
    for r in ASCEND_COMPILE():
        assert r["passes"] == ["VllmFlashCommPass"]  # vllm-ascend's own passes off (they need torchair)


@pytest.mark.parametrize("name, families", [
    ("all_reduce", {"mm_all_reduce"}),
    ("sequence_parallel", {"mm_reduce_scatter", "all_gather_mm"}),
])
def test_fusion_pass_compile_runs_fcpass_on_its_graph_module_and_the_numbers_hold(name, families):
    """It used to raise AttributeError: the manager hands the pass a GraphModule, not a Graph."""
    per_rank = ASCEND_COMPILE()
    for rank, r in enumerate(per_rank):
        result = r[name]
        assert set(result["matched"]) == families, result["matched"]
        for tokens, run in result["runs"].items():
            assert run["error"] <= 1e-5, (name, tokens, run["error"])
            paths = {path for _, path, _ in run["decisions"]}
            assert paths == {"fused" if tokens > THRESHOLD else "unfused"}, (name, tokens, run["decisions"])
    for tokens in per_rank[0][name]["runs"]:
        assert per_rank[0][name]["runs"][tokens]["decisions"] == per_rank[1][name]["runs"][tokens]["decisions"]
