"""vllm-ascend's MoE prepare/finalize, its real classes, through its compile path with fcpass on.

``PrepareAndFinalizeWithAllGather`` and ``PrepareAndFinalizeWithAll2All`` (``vllm_ascend/ops/fused_moe/
prepare_finalize.py``, the release built for the vLLM under test: 0.23 and 0.30, ``make test-ascend023`` /
``test-ascend030``) on 2 gloo ranks, in vllm-ascend's config and forward context, called as its MoE layer calls
them (0.23 ``AscendMoERunner.no_shared_forward_impl``, 0.30 ``AscendRoutedExperts.forward_impl``): the router's
gate (``F.linear`` of the layer's input: both releases compute it before ``prepare``, which gathers or splits
its logits with the tokens), ``prepare``, the experts, ``finalize``. The experts are a stand-in: vllm-ascend's
token dispatch and grouped matmul are NPU kernels (``npu_moe_init_routing``, ``npu_grouped_matmul``), so a
dense equivalent in plain matmuls stands in, its first matmul on ``prepare``'s tokens and its last into
``finalize``: the most a matmul can border these collectives. Compiled through vllm-ascend's
``fusion_pass_compile`` with fcpass and without (the reference).

- all_gather, TP=2 (``enable_flashcomm1`` on 0.23, vllm-ascend's sequence parallelism; on 0.30 the MoE config's
  ``is_sequence_parallel``, which vLLM sets at TP > 1 and DP > 1, set here at TP=2): its EP path, vllm-ascend's
  padding collectives on the EP group (0.23 with ``is_ep_comm=True``). fcpass leaves all three alone
  (the tokens' and the logits' gathers, the reduce), "expert-parallel collective" naming the op: the same bits
  and the same collective calls at every token count.
- all_gather, DP=2 (0.23 with ``enable_flashcomm1`` off, 0.30 not sequence parallel): its DP path, vLLM's
  ``all_gather`` / ``reduce_scatter`` on vLLM's DP group. fcpass fuses the gather into the experts' first matmul
  and their last matmul into the reduce_scatter; the logits' gather has no matmul after it.
- all2all, TP=2: ``prepare`` splits the tokens locally (no collective), ``finalize`` all_gathers the experts'
  output with ``dist.all_gather`` into the views of one buffer (Dynamo traces it as torch's functional
  ``all_gather_into_tensor``), into the layer's output: no matmul after it, fcpass leaves it alone ("no matmul
  consumer"). Sequence parallel (0.23's FlashComm v1, on in every forward of a MoE model with
  ``enable_flashcomm1``; 0.30's ``is_sequence_parallel``) the layer passes ``replace_allreduce`` and ``prepare``
  and ``finalize`` call no collective.

MC2 (``PrepareAndFinalizeWithMC2``) is not run: its communication is its token dispatcher's NPU kernels
(``npu_moe_distribute_dispatch(_v2)`` and its combine, which communicate over HCCL themselves, no collective a
graph shows); its own ``prepare`` is All2All's split (with the ``mc2_mask`` vllm-ascend's NPU model runner
reserves) and its ``finalize`` All2All's.

In vLLM's model graphs none of this is seen by a pass: vLLM's MoE runner calls the layer through its opaque
``vllm.moe_forward`` op on every platform but CPU and TPU (``MoERunner._select_forward``), so prepare/finalize
run inside it; this test compiles them as that op's body.
"""

import dataclasses
import inspect
import re

import pytest
import torch

from passes import report
from support import vllm_ascend_code as ascend
from support.engine_expectations import sorted_rows
from support.multirank import shared

THRESHOLD = 16
TOKENS = (64, 8)  # a forward's tokens (vllm-ascend's num_tokens): above the threshold, below it
HIDDEN, EXPERTS, TOP_K, FFN = 32, 4, 2, 16


@dataclasses.dataclass(frozen=True)
class Case:
    method: str  # "all_gather" / "all2all": vllm-ascend's MoECommType, its prepare_finalize class
    data_parallel_size: int
    sequence_parallel: bool  # 0.23: enable_flashcomm1; 0.30: the MoE config's is_sequence_parallel


CASES = {"all_gather, TP=2 (EP)": Case("all_gather", 1, True), "all_gather, DP=2": Case("all_gather", 2, False),
         "all2all, TP=2": Case("all2all", 1, False), "all2all, TP=2, sequence parallel": Case("all2all", 1, True)}


def _moe_config(vllm_config, sequence_parallel: bool):
    """vLLM's FusedMoEConfig as its FusedMoE layer makes it, with the groups vllm-ascend's AscendFusedMoE sets."""
    from vllm.distributed import get_dp_group, get_pcp_group, get_tp_group
    from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig, FusedMoEParallelConfig, MoEActivation,
                                                             RoutingMethodType)

    tp = get_tp_group().world_size
    parallel = FusedMoEParallelConfig.make(tp_size_=tp, pcp_size_=get_pcp_group().world_size,
                                           dp_size_=get_dp_group().world_size, sp_size_=tp if sequence_parallel else 1,
                                           vllm_parallel_config=vllm_config.parallel_config)
    sizes = {"intermediate_size": FFN, "intermediate_size_per_partition": FFN}  # 0.30's name, 0.23's
    fields = {field.name for field in dataclasses.fields(FusedMoEConfig)}
    config = FusedMoEConfig(num_experts=EXPERTS, experts_per_token=TOP_K, hidden_dim=HIDDEN,
                            num_local_experts=EXPERTS // parallel.ep_size, num_logical_experts=EXPERTS,
                            activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.Renormalize,
                            moe_parallel_config=parallel, in_dtype=torch.float32,
                            **{name: size for name, size in sizes.items() if name in fields})
    config.tp_group, config.dp_group = get_tp_group(), get_dp_group()
    return config


class MoE(torch.nn.Module):
    """A MoE layer's forward as vllm-ascend's runs it: the gate, ``prepare``, the experts (a dense stand-in of
    this rank's experts, the router's top-k weights on their outputs), ``finalize``."""

    def __init__(self, rank, prepare_finalize, local_experts: slice):
        super().__init__()
        self.prepare_finalize, self.local_experts = prepare_finalize, local_experts
        count = len(range(EXPERTS)[local_experts])
        self.gate = torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(0)))
        g = torch.Generator().manual_seed(1 + rank)
        self.w13 = torch.nn.Parameter(torch.randn(count * FFN, HIDDEN, generator=g) / HIDDEN ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(HIDDEN, count * FFN, generator=g) / (count * FFN) ** 0.5)

    def forward(self, x, replace_allreduce: bool, reduce_results: bool):
        logits = torch.nn.functional.linear(x, self.gate)  # its internal router: F.linear(x, gate.weight_fp32)
        prepared = self.prepare_finalize.prepare(x, logits, replace_allreduce=replace_allreduce)
        weights, ids = prepared.router_logits.softmax(-1).topk(TOP_K, dim=-1)
        routing = torch.zeros_like(prepared.router_logits).scatter(1, ids, weights / weights.sum(-1, keepdim=True))
        hidden = torch.nn.functional.silu(prepared.hidden_states @ self.w13.t())
        hidden = hidden * routing[:, self.local_experts].repeat_interleave(FFN, dim=1)
        return self.prepare_finalize.finalize(hidden @ self.w2.t(), reduce_results,
                                              prepared.padded_hidden_states_shape)


def _build(rank, vllm_config, case: Case):
    """The case's prepare_finalize class (vllm-ascend's) on the MoE config, in the layer above."""
    from vllm.distributed import get_ep_group
    from vllm_ascend.ops.fused_moe import prepare_finalize

    config = _moe_config(vllm_config, case.sequence_parallel)
    if case.method == "all2all":  # each rank every expert on its split (vllm-ascend's dispatcher all_to_alls the
        # tokens to their experts' ranks, which a dense stand-in needs not)
        return MoE(rank, prepare_finalize.PrepareAndFinalizeWithAll2All(config), slice(None))
    ep = get_ep_group()
    per_rank = EXPERTS // ep.world_size
    return MoE(rank, prepare_finalize.PrepareAndFinalizeWithAllGather(config),
               slice(ep.rank_in_group * per_rank, (ep.rank_in_group + 1) * per_rank))


def _replace_allreduce(model) -> bool:
    """What the release's MoE layer passes as ``replace_allreduce``: 0.23 FlashComm v1's switch of the forward,
    0.30 the MoE config's ``is_sequence_parallel``."""
    from vllm_ascend.ascend_forward_context import _EXTRA_CTX

    if ascend.TP_FLASHCOMM:
        return bool(_EXTRA_CTX.flash_comm_v1_enabled)
    return model.prepare_finalize.moe_config.is_sequence_parallel


def _input(rank, case: Case, tokens: int, tp_size: int):
    """A rank's input: its token shard (sequence parallel), its own tokens (DP), or the batch every TP rank holds."""
    rows = tokens // tp_size if case.sequence_parallel else tokens
    own = case.sequence_parallel or case.data_parallel_size > 1
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(tokens * 8 + (rank if own else 0)))


def run_moe(rank, world_size, name):
    import fcpass.vllm as fcpass_vllm
    from devtools.vllm_cpu import vllm_tp
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fcpass.vllm.compilation import ASCEND_PASS_KEY
    from support.vllm_backend import configure_post_pass

    case = CASES[name]
    switches = {"enable_flashcomm1": case.sequence_parallel} if ascend.TP_FLASHCOMM else {}
    config = fcpass_vllm.compilation_config({"threshold_tokens": THRESHOLD})
    results = {}
    with vllm_tp(rank, world_size, config, ascend.additional_config(**switches), ascend.model_config("qwen3_moe"),
                 data_parallel_size=case.data_parallel_size) as (vllm_config, tp), torch.no_grad():
        vllm_config.parallel_config.enable_expert_parallel = True  # --enable-expert-parallel (all2all needs it)
        ascend.init_config(vllm_config)
        ascend.load_ops()
        model = _build(rank, vllm_config, case)
        manager = configure_post_pass(vllm_config, GraphFusionPassManager(), ASCEND_PASS_KEY)
        compile_range = Range(start=1, end=8192)
        want_fn = ascend.compiled(model, GraphFusionPassManager(), compile_range)
        got_fn = ascend.compiled(model, manager, compile_range)
        reduce_results = case.method == "all_gather"  # isinstance(comm method, AllGatherCommImpl)
        for tokens in TOKENS:
            x = _input(rank, case, tokens, tp.world_size)
            with pass_context(compile_range), ascend.forward(vllm_config, tokens):
                replace_allreduce = _replace_allreduce(model)
                results[tokens] = {**ascend.want_and_got(want_fn, got_fn, x, replace_allreduce, reduce_results),
                                   "replace_allreduce": replace_allreduce}
        results["report"] = sorted(manager.passes[-1].last_report.rows())
    return results


RUNS = {name: shared(run_moe, name, setup=ascend.compile_setup, timeout=120) for name in CASES}


GATHER, REDUCE = "maybe_all_gather_and_maybe_unpad", "maybe_pad_and_reduce"
EP = report.EP_COLLECTIVE
# case -> (fcpass's report: (family, form, outcome constant) per collective, the collectives a forward calls
# without fcpass: vLLM's and vllm-ascend's ops, torch's functional ones)
OUTCOMES = {
    "all_gather, TP=2 (EP)": ([("all_gather_mm", "vllm_ascend/-", EP)] * 2
                              + [("mm_reduce_scatter", "vllm_ascend/-", EP)],
                              {f"vllm::{GATHER}": 2, "vllm::all_gather": 2, f"vllm::{REDUCE}": 1,
                               "vllm::reduce_scatter": 1}),
    "all_gather, DP=2": ([("all_gather_mm", "vllm/-", report.NO_MATMUL_CONSUMER),  # the router logits' gather
                          ("all_gather_mm", "vllm/mm", report.FUSED), ("mm_reduce_scatter", "vllm/mm", report.FUSED)],
                         {"vllm::all_gather": 2, "vllm::reduce_scatter": 1}),
    "all2all, TP=2": ([("all_gather_mm", "c10d_functional/-", report.NO_MATMUL_CONSUMER)],
                      {"_c10d_functional::all_gather_into_tensor": 1}),
    "all2all, TP=2, sequence parallel": ([], {}),
}


def _ops(calls: dict) -> dict:
    """The op-level collectives of a forward's calls (c10d's ProcessGroup calls under them left out)."""
    return {name: count for name, count in calls.items() if not name.startswith("c10d::")}


@pytest.mark.parametrize("name", CASES)
def test_each_collective_is_fused_or_left_alone_with_its_reason_and_the_numbers_hold(name):
    """Each collective's row in fcpass's report; at or below the threshold (and everywhere nothing is fused) the
    same bits and the same collective calls as without fcpass, above it a fused site within float32's bound."""
    rows, calls = OUTCOMES[name]
    fused = {family for family, _, kind in rows if kind == report.FUSED}
    per_rank = RUNS[name]()
    for r in per_rank:
        assert sorted_rows(r["report"]) == sorted(rows), r["report"]
        for tokens in TOKENS:
            run = r[tokens]
            assert run["replace_allreduce"] == CASES[name].sequence_parallel
            path = "fused" if tokens > THRESHOLD else "unfused"
            assert {decision[:2] for decision in run["decisions"]} == {(family, path) for family in fused}, run
            assert _ops(run["calls"]["want"]) == calls, run["calls"]
            assert run["rows"] == (tokens // 2 if CASES[name].sequence_parallel else tokens)  # the layer's input's
            if tokens <= THRESHOLD or not fused:
                assert run["same_bits"] and run["calls"]["got"] == run["calls"]["want"], (tokens, run)
            else:
                assert run["error"] <= (EXPERTS * FFN + 2) * torch.finfo(torch.float32).eps, (tokens, run["error"])
    for tokens in TOKENS:
        assert len({str(r[tokens]["decisions"]) for r in per_rank}) == 1  # the same protocol on every rank


def test_its_ep_collectives_are_named_in_the_reason():
    """The EP path's three collectives: the tokens' and the logits' gathers and the reduce, each named."""
    for r in RUNS["all_gather, TP=2 (EP)"]():
        assert sorted(outcome.split("(", 2)[2] for _, _, outcome in r["report"]) == [
            f"vllm-ascend's {GATHER} on its EP group)"] * 2 + [f"vllm-ascend's {REDUCE} on its EP group)"]


def test_the_fused_dp_path_calls_only_the_logits_gather_as_it_was():
    """Above the threshold the tokens' gather and the reduce_scatter are fcpass's (point-to-point on gloo): vLLM's
    all_gather is called once, for the router logits."""
    for r in RUNS["all_gather, DP=2"]():
        calls = _ops(r[TOKENS[0]]["calls"]["got"])
        assert calls.get("vllm::all_gather") == 1 and "vllm::reduce_scatter" not in calls, calls


def test_vllms_moe_runner_calls_the_layer_through_an_opaque_op():
    """Why a vLLM model graph shows none of this: vLLM's MoE runner calls the layer through ``vllm.moe_forward``
    (an opaque custom op; ``moe_forward_shared`` with shared experts) on every platform but TPU and CPU."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    source = inspect.getsource(MoERunner._select_forward)
    assert "torch.ops.vllm.moe_forward" in source
    assert set(re.findall(r"current_platform\.(is_\w+)\(\)", source)) == {"is_tpu", "is_cpu"}
