"""fcpass's sequence parallelism on torch functional collectives and a decomposed RMSNorm, with plain Inductor.

No vLLM here: the all_reduces are ``funcol.all_reduce`` (``_c10d_functional.all_reduce`` +
``wait_tensor`` in the graph), the norms plain aten math (pow, mean, add, rsqrt, mul),
and with no vLLM compile range the token count's own bounds decide the threshold:
a static count exactly, a dynamic one by its lower bound.
"""

import collections
import contextlib
import logging

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from standins import shm as shm_standin
from support import vllm_kernels
from fcpass.guard import ONEDNN_GENERIC_ONLY
from support.multirank import run_ranks
from passes.nodes import AUTO_FUNCTIONALIZED
from passes.report import (FASTER_TRANSPORT, FUSED, NEVER_FUSED, NO_MATMUL_CONSUMER, SP_BELOW_THRESHOLD, SP_NO_NORM,
                           SP_TRANSPORT, SPLIT)

HIDDEN, FFN = 64, 128


def rms_norm(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class TinyTP(torch.nn.Module):
    """A TP residual stream: two row-parallel all_reduces, each followed by (residual add +) RMSNorm.

    The first all_reduce's result is also the residual, as the embedding's is in vLLM's Llama.
    """

    def __init__(self, rank, world_size, group):
        super().__init__()
        shared = torch.Generator().manual_seed(0)  # replicated norm weights
        own = torch.Generator().manual_seed(1 + rank)  # this rank's weight shards
        self.group = group
        self.w_in = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=own) / HIDDEN ** 0.5)
        self.w_up = torch.nn.Parameter(torch.randn(HIDDEN, FFN // world_size, generator=own) / HIDDEN ** 0.5)
        self.w_down = torch.nn.Parameter(torch.randn(FFN // world_size, HIDDEN, generator=own) / FFN ** 0.5)
        self.norm1 = torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=shared))
        self.norm2 = torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=shared))

    def forward(self, x):
        h = self.all_reduce(self.matmul(x, "w_in"))
        residual = h
        up = self.matmul(rms_norm(h, self.norm1), "w_up")
        down = self.all_reduce(self.matmul(torch.relu(up), "w_down"))
        return rms_norm(down + residual, self.norm2)

    def matmul(self, x, weight_name):
        return x @ getattr(self, weight_name)

    def all_reduce(self, x):
        from torch.distributed._functional_collectives import all_reduce

        return all_reduce(x, "sum", self.group)


class OneDNNTinyTP(TinyTP):
    """The same with vLLM's CPU linear kernel (``_C.onednn_mm`` through a handler), as vLLM's CPU engine
    compiles its linears: the weight is packed into the handler, the graph never sees it."""

    def __init__(self, rank, world_size, group):
        from vllm import _custom_ops

        super().__init__(rank, world_size, group)
        self.handlers = {name: _custom_ops.create_onednn_mm(getattr(self, name).detach(), 32)
                         for name in ("w_in", "w_up", "w_down")}

    def matmul(self, x, weight_name):
        from vllm import _custom_ops

        return _custom_ops.onednn_mm(self.handlers[weight_name], x, None)


class ShmTinyTP(OneDNNTinyTP):
    """vLLM's CPU engine on a machine whose ``_C`` has shared-memory collectives (AVX-512 builds): the
    all_reduces go through vLLM's own ``CpuCommunicator`` in its shared-memory mode, in place on their input
    (``_C.shm_allreduce(handle, data)``: vLLM's own kernels where its AVX-512 build is loaded, else
    tests/standins/shm.py's)."""

    def __init__(self, rank, world_size, group):
        from vllm.distributed import parallel_state

        super().__init__(rank, world_size, group)
        self.communicator = parallel_state.get_tp_group().device_communicator
        assert type(self.communicator.dist_module).__name__ == "_CPUSHMDistributed"

    def all_reduce(self, x):
        return self.communicator.all_reduce(x)


class NoNorm(TinyTP):
    """An all_reduce read by a matmul directly: splitting it would shard nothing."""

    def forward(self, x):
        return self.all_reduce(x @ self.w_in) @ self.w_up


def layer_norm(x, weight, bias):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


class ParallelResidual(TinyTP):
    """GPT-NeoX's layout with LayerNorm (weight and bias): attention and MLP read the layer's input through
    norms of their own, and their all_reduced outputs are summed with it; a final LayerNorm."""

    def __init__(self, rank, world_size, group):
        super().__init__(rank, world_size, group)
        own, shared = torch.Generator().manual_seed(11 + rank), torch.Generator().manual_seed(10)
        self.w_up2 = torch.nn.Parameter(torch.randn(HIDDEN, FFN // world_size, generator=own) / HIDDEN ** 0.5)
        self.w_down2 = torch.nn.Parameter(torch.randn(FFN // world_size, HIDDEN, generator=own) / FFN ** 0.5)
        self.bias1, self.bias2 = (torch.nn.Parameter(0.1 * torch.randn(HIDDEN, generator=shared)) for _ in range(2))

    def forward(self, x):
        h = self.all_reduce(self.matmul(x, "w_in"))
        a = self.all_reduce(self.matmul(torch.relu(self.matmul(layer_norm(h, self.norm1, self.bias1), "w_up")),
                                        "w_down"))
        m = self.all_reduce(self.matmul(torch.relu(self.matmul(layer_norm(h, self.norm2, self.bias2), "w_up2")),
                                        "w_down2"))
        return layer_norm(h + a + m, self.norm1, self.bias2)


class LearnedPositions(TinyTP):
    """OPT's embedding: the all_reduced token embedding plus learned positions, which every rank looks up
    alike (full rows next to the shards: each rank takes its own), then LayerNorms."""

    def __init__(self, rank, world_size, group):
        super().__init__(rank, world_size, group)
        self.positions = torch.nn.Parameter(torch.randn(128, HIDDEN, generator=torch.Generator().manual_seed(12)))
        self.bias1 = torch.nn.Parameter(0.1 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(13)))

    def forward(self, x):
        positions = torch.nn.functional.embedding(torch.arange(x.shape[0]), self.positions)
        h = self.all_reduce(self.matmul(x, "w_in")) + positions
        up = self.matmul(layer_norm(h, self.norm1, self.bias1), "w_up")
        return layer_norm(self.all_reduce(self.matmul(torch.relu(up), "w_down")) + h, self.norm2, self.bias1)


class RankLocalRows(TinyTP):
    """This rank's own product added after the all_reduce: rows that differ per rank cannot be sharded like
    the same-everywhere ones, so the norm after it is not reached and nothing is split."""

    def forward(self, x):
        return rms_norm(self.all_reduce(self.matmul(x, "w_in")) + self.matmul(x, "w_in"), self.norm1)


def _op_name(node) -> str:
    """The op a node runs; for an auto_functionalized op (vLLM's in-place CPU kernels) the op inside."""
    return f"auto_functionalized({node.args[0]})" if node.target in AUTO_FUNCTIONALIZED else str(node.target)


class Recorded(CustomGraphPass):
    """The pass under test, plus the op counts it leaves; ``uuid() -> None`` keeps Inductor from caching."""

    def __init__(self, inner):
        self.inner, self.counts = inner, None

    def __call__(self, graph):
        self.inner(graph)
        self.counts = collections.Counter(_op_name(n) for n in graph.nodes if n.op == "call_function")

    def uuid(self):
        return None


CASES = {  # name: (model, token counts, dynamic, sequence_parallel_threshold_tokens; None: PassConfig's defaults)
    "dynamic": (TinyTP, (7, 64), True, 1),
    "static_odd": (TinyTP, (7,), False, 4),
    "static_below": (TinyTP, (8,), False, 100),
    "no_norm": (NoNorm, (8,), False, 4),
    "onednn": (OneDNNTinyTP, (8, 64, 33), True, 1),
    "shm": (ShmTinyTP, (8, 64, 33), True, 1),
    "onednn_defaults": (OneDNNTinyTP, (2, 8, 64), True, None),
    "parallel_residual": (ParallelResidual, (7, 64), True, 1),
    "learned_positions": (LearnedPositions, (7, 64), True, 1),
    "rank_local_rows": (RankLocalRows, (7, 64), True, 1),
}


class _Warnings(logging.Handler):
    """fcpass's WARNING records, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_cases(rank, world_size):
    with vllm_tp_group_in_shm_mode(rank, world_size):
        return {name: run_case(rank, world_size, name) for name in CASES}


@contextlib.contextmanager
def vllm_tp_group_in_shm_mode(rank, world_size):
    """vLLM's TP group over this world, its communicator in shared-memory mode (stand-in kernels)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    from devtools.vllm_cpu import agree_on_dist_ident

    shm_standin.register()
    agree_on_dist_ident()  # the communicator checks that every rank names the segment alike
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                                    backend="gloo", distributed_init_method="env://")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()


def run_case(rank, world_size, name):
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    import fcpass
    from passes import FlashCommPass

    model_class, counts, dynamic, sp_threshold = CASES[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = model_class(rank, world_size, dist.group.WORLD)
    fields = {"sequence_parallel": True} if sp_threshold is None else {
        "threshold_tokens": 16, "sequence_parallel": True, "sequence_parallel_threshold_tokens": sp_threshold}
    flashcomm = FlashCommPass(fcpass.PassConfig(**fields))
    recorded = Recorded(flashcomm)
    errors, decisions = [], []

    def compiled_with(pass_, inputs):
        torch._dynamo.reset()
        with inductor_config.patch({"post_grad_custom_post_pass": pass_}), torch.no_grad():
            compiled = torch.compile(model, fullgraph=True, dynamic=None if dynamic else False)
            for x in inputs:
                if dynamic:
                    torch._dynamo.mark_dynamic(x, 0)  # sizes 0 and 1 are specialized: its lower bound is 2
                want = model(x)
                fcpass.reset_decision_counts()
                got = compiled(x)
                decisions.append({(op, path): n for (op, path, _), n in fcpass.decision_counts().items()})
                errors.append(((got - want).abs().max() / want.abs().max()).item())
        return {reason for _, _, reason in fcpass.decision_counts()}

    inputs = [torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n)) for n in counts]  # equal on all ranks
    warnings = _Warnings()
    logging.getLogger("fcpass").addHandler(warnings)
    try:
        reasons = compiled_with(recorded, inputs)
    finally:
        logging.getLogger("fcpass").removeHandler(warnings)
    if name == "onednn":  # a backend forced by the user that cannot call a oneDNN handler: unfused, same result
        reasons = compiled_with(FlashCommPass(fcpass.PassConfig(backend="cuda", **fields)), inputs[-1:])
    outcomes = [(o.family, o.form, o.kind) for o in flashcomm.last_report.outcomes]
    return {"counts": recorded.counts, "errors": errors, "decisions": decisions, "reasons": reasons,
            "warnings": warnings.messages,
            "outcomes": outcomes, "shm_kernels": "real" if shm_standin.real_kernels_loaded() else "stand-in"}


@pytest.fixture(scope="module", params=["loaded", "avx2"])
def runs(request):
    """Ranks of their own (the shm case may register stand-in ``_C`` shm collectives for the rest of the
    process), once with the kernel library vLLM loads on this CPU and once with its AVX2 build."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (vllm_kernels.avx2_env() if request.param == "avx2" else {}).items():
            env.setenv(key, value)
        per_rank = run_ranks(run_cases, 2, timeout=240)
    runs = {name: [cases[name] for cases in per_rank] for name in CASES}
    if request.param == "avx2":  # what makes this run the other build's: vLLM's shm kernels are not there
        assert {r["shm_kernels"] for r in runs["shm"]} == {"stand-in"}
    return runs


@pytest.mark.parametrize("name", ["dynamic", "static_odd"])
def test_functional_all_reduce_and_aten_norm_are_split_and_fused(runs, name):
    for r in runs[name]:
        counts = r["counts"]
        assert counts["_c10d_functional.all_reduce.default"] == 0
        assert counts["fcpass.mm_reduce_scatter.default"] == 2  # both all_reduce inputs are matmuls
        assert counts["fcpass.all_gather_mm.default"] == 1  # before w_up
        assert counts["_c10d_functional.all_gather_into_tensor.default"] == 1  # the output's
        assert sorted(r["outcomes"]) == sorted(
            [("sequence_parallel", "c10d_functional", SPLIT)] * 2
            + [("mm_reduce_scatter", "c10d_functional/mm+pad", FUSED)] * 2
            + [("all_gather_mm", "c10d_functional/mm+unpad", FUSED),
               ("all_gather_mm", "c10d_functional/-", NO_MATMUL_CONSUMER)])
        assert max(r["errors"]) <= 1e-5, r["errors"]


def test_graphs_below_the_threshold_are_left_unsplit_and_their_all_reduces_fused(runs):
    """A static count at or below the threshold: the split (it changes shapes: decided per compiled graph)
    stays off; matmul -> all_reduce fuses both sites instead (no shape changes), and its guard keeps these
    token counts (at or below threshold_tokens 16) on the plain path."""
    for r in runs["static_below"]:
        assert r["counts"]["_c10d_functional.all_reduce.default"] == 0
        assert r["counts"]["fcpass.mm_all_reduce.default"] == 2
        assert r["counts"]["_c10d_functional.reduce_scatter_tensor.default"] == 0
        assert r["outcomes"] == ([("sequence_parallel", "c10d_functional", SP_BELOW_THRESHOLD)] * 2
                                 + [("mm_all_reduce", "c10d_functional/mm", FUSED)] * 2)
        assert all(d == {("mm_all_reduce", "unfused"): 2} for d in r["decisions"]), r["decisions"]
        assert max(r["errors"]) <= 1e-5


def test_the_defaults_leave_the_cpu_engines_graph_as_it_was(runs):
    """The defaults (``PassConfig(sequence_parallel=True)``) on the CPU engine's forms compiled as vLLM's CPU
    backend compiles them: one graph for every token count from 2 up, so it serves decode batches. The split
    stays off (it changes shapes: decided per compiled graph, and this one serves decode sizes), and
    matmul -> all_reduce leaves its sites alone too: on CPU tensors its fused path is never taken by default."""
    for r in runs["onednn_defaults"]:
        assert r["counts"]["_c10d_functional.all_reduce.default"] == 2
        assert r["counts"]["fcpass.mm_all_reduce_onednn.default"] == 0
        assert r["outcomes"] == ([("sequence_parallel", "c10d_functional", SP_BELOW_THRESHOLD)] * 2
                                 + [("mm_all_reduce", "c10d_functional/onednn_mm", NEVER_FUSED)] * 2)
        assert all(d == {} for d in r["decisions"]), r["decisions"]
        assert max(r["errors"]) <= 1e-5


def test_sequence_parallel_asked_for_on_one_graph_for_all_sizes_warns_once(runs):
    """The defaults with ``sequence_parallel=True`` on the CPU engine's one graph split nothing: said at WARNING
    (once per process), naming the setting, not only in the report."""
    for r in runs["onednn_defaults"]:
        (message,) = r["warnings"]
        assert "serves every token count from 2 up" in message and "sequence_parallel_threshold_tokens=1000" in message
    assert all(not r["warnings"] for name in CASES if name != "onednn_defaults" for r in runs[name])


def test_all_reduce_without_a_norm_is_left_unsplit_and_fused(runs):
    for r in runs["no_norm"]:
        assert r["counts"]["_c10d_functional.all_reduce.default"] == 0
        assert r["outcomes"] == [("sequence_parallel", "c10d_functional", SP_NO_NORM),
                                 ("mm_all_reduce", "c10d_functional/mm", FUSED)]
        assert r["decisions"] == [{("mm_all_reduce", "unfused"): 1}]  # 8 tokens, threshold 16
        assert max(r["errors"]) <= 1e-5


def test_vllm_shm_all_reduce_is_left_alone_its_transport_is_faster(runs):
    """vLLM's shared-memory all_reduce: the split's reduce_scatter and all_gather, and the fused op's
    all_reduce, would run over gloo, slower than it, so it is kept (its group found by the handle's owner all
    the same) and the report says why, for both families."""
    for r in runs["shm"]:
        assert r["counts"]["auto_functionalized(_C.shm_allreduce.default)"] == 2
        assert r["counts"]["fcpass.mm_reduce_scatter_onednn.default"] == 0
        assert r["counts"]["fcpass.mm_all_reduce_onednn.default"] == 0
        assert r["outcomes"] == ([("sequence_parallel", "shm", SP_TRANSPORT)] * 2
                                 + [("mm_all_reduce", "shm/onednn_mm", FASTER_TRANSPORT)] * 2)
        assert r["decisions"][:3] == [{}, {}, {}]
        assert max(r["errors"]) <= 1e-5, r["errors"]


def test_vllm_cpu_onednn_linears_fuse_with_their_handlers(runs):
    """vLLM's CPU linears (handler, no weight tensor) fuse into the oneDNN forms of the fused ops."""
    for r in runs["onednn"]:
        counts = r["counts"]
        assert counts["_c10d_functional.all_reduce.default"] == 0
        assert counts["fcpass.mm_reduce_scatter_onednn.default"] == 2
        assert counts["fcpass.all_gather_onednn_mm.default"] == 1
        assert not any(op.startswith("auto_functionalized") for op in counts)  # every onednn_mm in a fused op
        assert ("sequence_parallel", "c10d_functional", SPLIT) in r["outcomes"]
        assert ("all_gather_mm", "c10d_functional/onednn_mm+unpad", FUSED) in r["outcomes"]
        assert max(r["errors"]) <= 1e-5, r["errors"]
        # 8 tokens: at or below the threshold 16; 64: fused; 33: the scatters get a padded row, which a oneDNN
        # matmul cannot keep a (rank 0) bias off, so they run unfused on every rank; the gather (34) fuses
        assert r["decisions"][:3] == [
            {("mm_reduce_scatter_onednn", "unfused"): 2, ("all_gather_onednn_mm", "unfused"): 1},
            {("mm_reduce_scatter_onednn", "fused"): 2, ("all_gather_onednn_mm", "fused"): 1},
            {("mm_reduce_scatter_onednn", "unfused"): 2, ("all_gather_onednn_mm", "fused"): 1}]
    for r in runs["onednn"]:  # compiled again with backend="cuda", 33 tokens again
        assert r["decisions"][3] == {("mm_reduce_scatter_onednn", "unfused"): 2, ("all_gather_onednn_mm", "unfused"): 1}
        assert r["reasons"] == {ONEDNN_GENERIC_ONLY}


def test_layernorm_and_the_parallel_residual_layout_are_split_and_fused(runs):
    """Three all_reduces (the embedding-like input, attention, MLP), each LayerNorm'd reader gathered into its
    matmul, the final norm's output gathered plainly."""
    for r in runs["parallel_residual"]:
        assert r["counts"]["_c10d_functional.all_reduce.default"] == 0
        assert r["counts"]["fcpass.mm_reduce_scatter.default"] == 3
        assert r["counts"]["fcpass.all_gather_mm.default"] == 2
        assert sorted(r["outcomes"]) == sorted(
            [("sequence_parallel", "c10d_functional", SPLIT)] * 3
            + [("mm_reduce_scatter", "c10d_functional/mm+pad", FUSED)] * 3
            + [("all_gather_mm", "c10d_functional/mm+unpad", FUSED)] * 2
            + [("all_gather_mm", "c10d_functional/-", NO_MATMUL_CONSUMER)])
        assert max(r["errors"]) <= 1e-5, r["errors"]


def test_rows_every_rank_holds_alike_are_sharded_at_run_time(runs):
    """The learned positions meet the embedding's shard: each rank takes its rows of them when the op runs
    (``fcpass.token_shard``: the graph, shared by the ranks, holds no rank)."""
    for r in runs["learned_positions"]:
        assert r["counts"]["fcpass.token_shard.default"] == 1
        assert r["counts"]["_c10d_functional.all_reduce.default"] == 0
        assert r["counts"]["fcpass.mm_reduce_scatter.default"] == 2
        assert r["counts"]["fcpass.all_gather_mm.default"] == 1
        assert max(r["errors"]) <= 1e-5, r["errors"]


def test_rows_that_differ_per_rank_stop_the_split_and_the_numbers_hold(runs):
    for r in runs["rank_local_rows"]:
        assert r["counts"]["fcpass.token_shard.default"] == 0
        assert r["counts"]["_c10d_functional.reduce_scatter_tensor.default"] == 0
        assert [(family, kind) for family, _, kind in r["outcomes"]] == [
            ("sequence_parallel", SP_NO_NORM), ("mm_all_reduce", FUSED)]
        assert max(r["errors"]) <= 1e-5, r["errors"]
