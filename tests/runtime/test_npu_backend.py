"""fcpass's Ascend backend, run against a stand-in torch_npu on real gloo ranks.

The stand-in (tests/standins/npu) raises on every documented kernel
constraint, so a passing test shows fcpass never calls the kernels with an
argument set the real ones reject, and that bias folding and the W8A8
plumbing (scales, output dtype, quant bias) give the reference answer.
Not verified on Ascend hardware.
"""

import pytest
import torch

from support.cases import Case
from support.multirank import shared
from support.npu_runs import NPU_GROUP_BACKEND, npu_setup, run_npu_cases, run_npu_scaled
from support.scaled_runs import QUANT_TOLERANCE
from test_ops_multirank import check_results

K = 256  # the kernels' minimum k


def _shared(fn, *args, world_size=2):
    return shared(fn, *args, world_size=world_size, backend=NPU_GROUP_BACKEND, setup=npu_setup)


def _fallback_cases():
    rs = [Case(m=64, k=K, dtype=torch.float32, threshold=0), Case(m=64, k=128, dtype=torch.bfloat16, threshold=0)]
    ag = [Case(m=8, k=100, ns=(16,), dtype=torch.bfloat16, threshold=0)]
    return rs, ag


TWO_RANKS = {
    "fallback": _shared(run_npu_cases, *_fallback_cases()),
    "ag_w8a8": _shared(run_npu_scaled, "ag", torch.int8, 16, K, (64, 32), 0),
    **{("rs_w8a8", per_token): _shared(run_npu_scaled, "rs", torch.int8, 64, K, 64, 63, per_token)
       for per_token in (False, True)},
    # npu_mm_all_reduce_base's three W8A8 scale forms, and an output it does not have (float32: unfused).
    **{("ar_w8a8", per_token, out_dtype): _shared(run_npu_scaled, "ar", torch.int8, 37, K, 64, 0, per_token,
                                                  out_dtype)
       for per_token in (False, True) for out_dtype in (torch.bfloat16, torch.float16, torch.float32)},
}


def _fused_count(results):
    return sum(r["decision"][1] == "fused" for r in results)


def _kernel_cases(world_size):
    rs, ag, ar = [], [], []
    for dtype in (torch.bfloat16, torch.float16):
        for bias in (False, True):
            for m in (8 * world_size, 64 * world_size):
                rs += [Case(m=m, k=K, ns=(64,), dtype=dtype, bias=bias, threshold=t, seed=len(rs)) for t in (m - 1, m)]
            m = 16
            ag += [Case(m=m, k=K, ns=(64, 32), dtype=dtype, bias=bias, threshold=t, seed=50 + len(ag))
                   for t in (m * world_size - 1, m * world_size)]
            m = 8 * world_size + 1  # an all_reduce needs no divisible token count
            ar += [Case(m=m, k=K, ns=(64,), dtype=dtype, bias=bias, threshold=t, seed=100 + len(ar)) for t in (m - 1, m)]
    return rs, ag, ar


KERNELS = {ws: _shared(run_npu_cases, *_kernel_cases(ws), world_size=ws) for ws in (2, 4)}


def _on_npu_subgroups(rank, world_size):
    """mm_all_reduce through npu_mm_all_reduce_base on 2-rank subgroups [0, 2] and [1, 3] of 4 ranks."""
    import torch.distributed as dist

    import fcpass
    from standins import npu_kernels
    from support.npu_runs import NPU_GROUP_BACKEND, with_standin_calls
    from support.op_runs import run_on_group

    groups = [dist.new_group([0, 2], backend=NPU_GROUP_BACKEND), dist.new_group([1, 3], backend=NPU_GROUP_BACKEND)]
    group = groups[rank % 2]
    del npu_kernels.comm_name_ranks[:]  # bodies before this one in the same ranks asked for the world group's
    fcpass.configure(fcpass.PassConfig(backend="npu"))
    cases = [Case(m=9, k=K, ns=(32,), dtype=torch.bfloat16, bias=True, threshold=0, seed=300)]
    results, calls = with_standin_calls(
        lambda: run_on_group(dist.get_rank(group), dist.get_world_size(group), group.group_name, (), (), cases))
    return {"results": results, "calls": calls, "comm_name_ranks": list(npu_kernels.comm_name_ranks)}


SUBGROUPS = _shared(_on_npu_subgroups, world_size=4)


def _sum_of_products(rank, world_size):
    """Falcon's scatter after a sum of two products, above the threshold, on the NPU backend and on the generic
    one, against the float64 sum of every rank's products."""
    import torch.distributed as dist

    import fcpass
    from support.npu_runs import with_standin_calls

    g = torch.Generator().manual_seed(7)
    xs = [[torch.randn(64, k, generator=g).to(torch.bfloat16) for k in (K, 2 * K)] for _ in range(world_size)]
    ws = [[torch.randn(k, 32, generator=g).to(torch.bfloat16) / k ** 0.5 for k in (K, 2 * K)] for _ in range(world_size)]
    full = sum(x.double() @ w.double() for r in range(world_size) for x, w in zip(xs[r], ws[r]))
    want = full.chunk(world_size)[rank]
    results = {}
    for backend in ("npu", "generic"):
        fcpass.configure(fcpass.PassConfig(backend=backend))
        fcpass.reset_decision_counts()
        out, calls = with_standin_calls(lambda: torch.ops.fcpass.mm_sum_reduce_scatter(
            xs[rank], ws[rank], [None, None], dist.group.WORLD.group_name, world_size, 0))
        ((_, path, reason),) = fcpass.decision_counts()
        results[backend] = {"path": path, "reason": reason, "calls": calls,
                            "error": ((out.double() - want).abs().max() / want.abs().max()).item()}
    return results


SUMS = _shared(_sum_of_products)


def test_a_sum_of_products_runs_unfused_on_the_npu_kernel_and_fused_on_the_generic_pipeline():
    """torch_npu's kernel multiplies one x by one weight: a sum is declined (no kernel call), same on each rank."""
    from fcpass.backends.npu import SUM_ONE_MATMUL_KERNEL

    for r in SUMS():
        assert (r["npu"]["path"], r["npu"]["reason"], r["npu"]["calls"]) == ("unfused", SUM_ONE_MATMUL_KERNEL, [])
        assert (r["generic"]["path"], r["generic"]["calls"]) == ("fused", [])
        assert max(r["npu"]["error"], r["generic"]["error"]) < 2e-2


def test_the_hccl_comm_name_is_asked_with_the_global_rank():
    """torch_npu's docs: get_hccl_comm_name's rankid is the global rank; on a subgroup it is not the group rank
    (rank 2 is rank 1 of [0, 2]). The stand-in rejects any other rankid."""
    per_rank = SUBGROUPS()
    for global_rank, r in enumerate(per_rank):
        assert r["comm_name_ranks"] == [global_rank]
        assert [name for name, _ in r["calls"]] == ["npu_mm_all_reduce_base"]
    for group_ranks in ((0, 2), (1, 3)):
        check_results([per_rank[rank]["results"] for rank in group_ranks])


@pytest.mark.parametrize("world_size", [2, 4])
def test_npu_kernels_match_reference(world_size):
    rs, ag, ar = _kernel_cases(world_size)
    per_rank = KERNELS[world_size]()
    check_results([r["results"] for r in per_rank])
    for rank, r in enumerate(per_rank):
        kernels = [name for name, _ in r["calls"]]
        assert len(kernels) == _fused_count(r["results"])  # every fused decision reached a kernel
        assert kernels.count("npu_mm_reduce_scatter_base") == len(rs) // 2
        assert kernels.count("npu_all_gather_base_mm") == len(ag) // 2
        assert kernels.count("npu_mm_all_reduce_base") == len(ar) // 2
        # The all_reduce kernel takes the row-parallel bias itself, where vLLM has it: on rank 0 only.
        biased = [facts["bias"] for name, facts in r["calls"] if name == "npu_mm_all_reduce_base"]
        assert biased == [rank == 0 and case.bias for case in ar if case.threshold < case.m]


def test_npu_falls_back_where_kernel_cannot_take_the_case():
    """fp32 and k outside [256, 65535) stay unfused above the threshold, on every rank alike."""
    per_rank = TWO_RANKS["fallback"]()
    for r in per_rank:
        assert r["calls"] == []
        reasons = [res["decision"] for res in r["results"]]
        assert [d[1] for d in reasons] == ["unfused"] * 3
        assert "dtype torch.float32 not supported" in reasons[0][2]
        assert "k 128 < kernel minimum 256" in reasons[1][2]
        assert "k 100 < kernel minimum 256" in reasons[2][2]
        assert all(res["error"] < 2e-2 for res in r["results"])
    assert per_rank[0]["results"][0]["decision"] == per_rank[1]["results"][0]["decision"]


@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
def test_npu_w8a8_mm_reduce_scatter_with_rank0_quant_bias(per_token):
    per_rank = TWO_RANKS[("rs_w8a8", per_token)]()
    for r in per_rank:
        assert r["decision"][1] == "fused"
        assert r["error"] <= QUANT_TOLERANCE
        ((kernel, facts),) = r["calls"]
        assert kernel == "npu_mm_reduce_scatter_base" and facts["quant"] and facts["x1_scale"] == per_token
    # rank 0 holds the quant bias and folds it in as extra int8 columns; rank 1 does not
    assert per_rank[0]["calls"][0][1]["k"] > K == per_rank[1]["calls"][0][1]["k"]


def test_npu_w8a8_all_gather_mm_with_quant_bias():
    per_rank = TWO_RANKS["ag_w8a8"]()
    for r in per_rank:
        assert r["decision"][1] == "fused" and r["error"] <= QUANT_TOLERANCE
        ((kernel, facts),) = r["calls"]
        assert kernel == "npu_all_gather_base_mm" and facts["quant"]


@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor", "per_token"])
def test_npu_w8a8_mm_all_reduce_scale_forms(per_token):
    """bf16 out: a bf16 dequant scale; fp16 out: float32 with the per-token scale, else packed into int64;
    float32 out: the kernel has none, so unfused on every rank, saying why."""
    expected = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float32 if per_token else torch.int64}
    for out_dtype, dequant_dtype in expected.items():
        per_rank = TWO_RANKS[("ar_w8a8", per_token, out_dtype)]()
        for r in per_rank:
            assert r["decision"][1] == "fused" and r["error"] <= QUANT_TOLERANCE, (out_dtype, r)
            ((kernel, facts),) = r["calls"]
            assert kernel == "npu_mm_all_reduce_base" and facts["quant"]
            assert facts["dequant_dtype"] == dequant_dtype and facts["pertoken_scale"] == per_token
    for r in TWO_RANKS[("ar_w8a8", per_token, torch.float32)]():
        assert r["calls"] == [] and r["error"] <= QUANT_TOLERANCE
        assert r["decision"][1] == "unfused" and "float16 or bfloat16, not torch.float32" in r["decision"][2]


def test_standin_rejects_what_the_kernel_rejects():
    """The stand-in is only as good as its checks: each documented constraint raises."""
    from standins import npu_kernels as torch_npu  # the emulation itself: this process gains no `torch_npu` module
    x = torch.zeros(8, 256, dtype=torch.bfloat16)
    w = torch.zeros(256, 16, dtype=torch.bfloat16)
    bad = {
        "k=": (torch.zeros(8, 128, dtype=torch.bfloat16), torch.zeros(128, 16, dtype=torch.bfloat16), {}),
        "dtype": (x.float(), w.float(), {}),
        "bias is not supported": (x, w, {"bias": torch.zeros(16, dtype=torch.bfloat16)}),
        "world_size 3": (x, w, {"world_size": 3}),
        "unknown hcom": (x, w, {}),
    }
    for message, (a, b, kwargs) in bad.items():
        world_size = kwargs.pop("world_size", 2)
        with pytest.raises(torch_npu.KernelArgumentError, match=message):
            torch_npu.npu_mm_reduce_scatter_base(a, b, "no-such-hcom", world_size, **kwargs)
    x8, w8 = torch.zeros(8, 256, dtype=torch.int8), torch.zeros(256, 16, dtype=torch.int8)
    scale = torch.ones(16)
    bad_all_reduce = {
        "must not be empty": (x[:0], w, {}),
        "float16 or bfloat16 alike": (x.float(), w.float(), {}),
        r"bias torch.bfloat16 \(n,\)": (x, w, {"bias": torch.zeros(16)}),
        "reduce_op must be 'sum'": (x, w, {"reduce_op": "max"}),
        "dequant_scale .* required": (x8, w8, {}),
        "needs a pertoken_scale": (x8, w8, {"dequant_scale": scale}),
        "bias int32": (x8, w8, {"dequant_scale": scale.bfloat16(), "bias": torch.zeros(16)}),
        r"quantized k=65536 > 65535": (torch.zeros(1, 65536, dtype=torch.int8), torch.zeros(65536, 1, dtype=torch.int8),
                                       {"dequant_scale": torch.ones(1).bfloat16()}),
        "not emulated": (x, w, {"x3": x}),
        "unknown hcom": (x, w, {}),
    }
    for message, (a, b, kwargs) in bad_all_reduce.items():
        with pytest.raises(torch_npu.KernelArgumentError, match=message):
            torch_npu.npu_mm_all_reduce_base(a, b, "no-such-hcom", **kwargs)


@pytest.mark.parametrize("x_scale_kind", ["per_tensor", "per_token"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_w8a8_matmul_on_npu_tensors_is_torch_npus_quant_matmul(x_scale_kind, out_dtype):
    """NPU has no ``torch._int_mm``: fcpass's W8A8 Matmul on NPU tensors (the unfused paths, the NPU backend's
    extra gather consumers) calls ``npu.npu_quant_matmul`` with its scales translated; the stand-in (its real
    schema, its checks) computes the same as the CPU path."""
    from fcpass.matmuls import Matmul, npu_w8a8
    from standins import npu_kernels  # noqa: F401  (registers torch.ops.npu.*; this process gains no torch_npu)
    from support.scaled_runs import quant_inputs
    x, w, x_scale, w_scale, bias = quant_inputs(0, 37, K, 64, torch.int8, 5, with_bias=True,
                                                per_token=x_scale_kind == "per_token")
    per_token = x_scale if x_scale_kind == "per_token" else None
    mm = Matmul(w, bias, w_scale=w_scale, x_scale=None if per_token is not None else x_scale, out_dtype=out_dtype)
    want = mm(x, per_token)  # the CPU path, torch._int_mm
    got = npu_w8a8(x, mm, per_token)
    assert got.dtype == out_dtype and got.shape == want.shape
    assert ((got.double() - want.double()).abs().max() / want.double().abs().max()).item() <= QUANT_TOLERANCE
