"""Below its threshold a fused op does exactly what the graph did: the site's own collective and matmul ops.

Every family x collective form x matmul kind, compiled by Inductor with fcpass (every call below the
threshold) and without it, on 2 gloo ranks with vLLM's real TP group and the kernel library vLLM loads
(and, in processes of their own, the other builds this CPU can run): the outputs are the same bits, and
the collective ops called, counted by torch's profiler (vLLM's custom ops, the functional ones, c10d's,
vLLM's shm kernel) and vLLM's device communicator's calls, are the same calls. Before the unfused path ran
the site's own ops, the vLLM forms moved their collectives off vLLM's communicator (counts differ) and,
on vLLM's ``_C_AVX512`` build, rounded bf16 sums differently from its shm kernel (bits differ).
"""

from __future__ import annotations

import pytest
import torch

from devtools.launch import run_ranks
from devtools.vllm_cpu import rank_setup
from support import vllm_kernels
from support.collective_calls import collective_events, counting, profiled

TOKENS = (4, 8, 66)  # decode sizes and a prefill one, all below the threshold; even: vLLM's scatter needs it;
# a gather of one row per rank is not a site (Inductor decomposes a one-row matmul into pointwise code)
THRESHOLD = 1 << 20
K, N = 64, 48
FAMILIES = ("mm_reduce_scatter", "all_gather_mm", "mm_all_reduce", "sum_reduce_scatter")  # the last: Falcon's
MATMULS = ("plain", "w8a8", "onednn")


def _cases(shm: bool):
    """Every (family, collective form, matmul kind) this build's collectives can run.

    On the AVX-512 builds (``shm``) vLLM's communicator runs its shm kernels: the all_reduce form of the CPU
    engine, and an all_gather kernel with no int8 (the W8A8 gather site moves its quantize before the
    gather, so the gather moves int8 rows: a site for vllm-ascend's communicator, not vLLM's CPU one)."""
    forms = ("vllm", "c10d_functional")
    cases = [(family, form, mm) for family in FAMILIES for form in forms for mm in MATMULS
             if (family, mm) != ("sum_reduce_scatter", "w8a8")]  # no fused op over a sum of W8A8 products
    if shm:
        cases.remove(("all_gather_mm", "vllm", "w8a8"))
        cases += [("mm_all_reduce", "shm", mm) for mm in MATMULS]
    return cases


class Site(torch.nn.Module):
    """One site as vLLM's layers trace: a row-parallel linear (bias on rank 0 only) into its collective, a
    gather into two column-parallel linears, or (Falcon) two row-parallel linears of the same tokens, their
    inputs of different widths, summed into one reduce_scatter; ``matmul``: aten's linear, Ascend's W8A8 (its quantize and quant
    matmul) or vLLM's CPU oneDNN linear."""

    def __init__(self, rank, tp, family, form, matmul, dtype):
        super().__init__()
        from vllm import _custom_ops

        g = torch.Generator().manual_seed(rank)
        self.tp, self.family, self.form, self.matmul = tp, family, form, matmul
        n_out = {"all_gather_mm": (N, N + 8), "sum_reduce_scatter": (N, N)}.get(family, (N,))
        k_in = (K, 2 * K) if family == "sum_reduce_scatter" else (K, K)
        row_bias = family != "all_gather_mm" and rank == 0
        self.w = [torch.randn(n, k, generator=g).to(dtype) / k ** 0.5 for n, k in zip(n_out, k_in)]
        self.b = [torch.randn(n, generator=g).to(dtype) if row_bias or family == "all_gather_mm" else None
                  for n in n_out]
        self.q = [torch.randint(-127, 128, (K, n), generator=g, dtype=torch.int8) for n in n_out]
        self.deq = [torch.rand(n, generator=g) * 2e-3 for n in n_out]
        self.qb = [torch.randint(-500, 500, (n,), generator=g, dtype=torch.int32) if row_bias else None for n in n_out]
        self.in_scale = torch.tensor([40.0])
        self.handlers = ([_custom_ops.create_onednn_mm(w.t(), 32) for w in self.w] if matmul == "onednn" else [])

    def linear(self, x, i):
        if self.matmul == "w8a8":
            q = torch.ops.npu.npu_quantize(x, self.in_scale, None, 12, -1, False)  # qint8, as vllm-ascend
            return torch.ops.npu.npu_quant_matmul(q, self.q[i], self.deq[i], bias=self.qb[i], output_dtype=15)
        if self.matmul == "onednn":
            from vllm import _custom_ops

            return _custom_ops.onednn_mm(self.handlers[i], x, self.b[i])
        return torch.nn.functional.linear(x, self.w[i], self.b[i])

    def collective(self, y):
        tp, ws, functional = self.tp, self.tp.world_size, torch.ops._c10d_functional
        name = tp.unique_name if self.form == "vllm" else tp.device_group.group_name
        if self.family in ("mm_reduce_scatter", "sum_reduce_scatter"):
            if self.form == "vllm":
                return torch.ops.vllm.reduce_scatter(y, 0, ws, name)
            return functional.wait_tensor(functional.reduce_scatter_tensor(y, "sum", ws, name))
        if self.form == "vllm":
            return torch.ops.vllm.all_reduce(y, name)
        if self.form == "shm":  # as vLLM's CPU communicator traces: its kernel, in place
            tp.device_communicator.dist_module.all_reduce(y)
            return y
        return functional.wait_tensor(functional.all_reduce(y, "sum", name))

    def gather(self, x):
        tp, functional = self.tp, torch.ops._c10d_functional
        if self.form == "vllm":
            return torch.ops.vllm.all_gather(x, 0, tp.world_size, tp.unique_name)
        return functional.wait_tensor(functional.all_gather_into_tensor(x, tp.world_size, tp.device_group.group_name))

    def forward(self, x):
        if self.family == "all_gather_mm":
            g = self.gather(x)
            return self.linear(g, 0), self.linear(g, 1)
        if self.family == "sum_reduce_scatter":
            return self.collective(self.linear(x, 0) + self.linear(torch.cat([x, x.flip(0)], 1), 1))
        return self.collective(self.linear(x, 0))


def run_below_threshold(rank, world_size):
    import sys

    from torch._inductor import config as inductor_config
    from vllm.platforms import current_platform

    import fcpass
    from devtools.vllm_cpu import vllm_tp
    from passes import FlashCommPass
    from support.npu_runs import STANDIN_DIR

    sys.path.insert(0, STANDIN_DIR)
    import torch_npu  # noqa: F401  (the stand-in: torch.ops.npu's W8A8 ops, CPU kernels)

    current_platform.import_kernels()  # as vLLM's workers do, before their groups: the shm communicator
    results = {"kernels": vllm_kernels.loaded_library(), "shm": hasattr(torch.ops._C, "shm_allreduce")}
    with vllm_tp(rank, world_size) as (_, tp), torch.no_grad():
        calls = counting(tp)
        for family, form, matmul in _cases(results["shm"]):
            dtype = torch.bfloat16 if matmul != "w8a8" else torch.float32
            model = Site(rank, tp, family, form, matmul, dtype)
            runs = {}
            for label, pass_ in (("without", None),
                                 ("with", FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLD,
                                                                          keep_faster_transports=False)))):
                torch._dynamo.reset()
                with inductor_config.patch({"post_grad_custom_post_pass": pass_}):
                    compiled = torch.compile(model, fullgraph=True, dynamic=True)
                    outs = {}
                    for tokens in TOKENS:
                        rows = tokens // world_size if family == "all_gather_mm" else tokens
                        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(tokens)).to(dtype)
                        compiled(x)  # the first call of a size compiles; the counted one runs what was compiled
                        calls.clear()
                        fcpass.reset_decision_counts()
                        with profiled() as prof:
                            out = compiled(x)
                        fused = sum(e.name.startswith("fcpass::") for e in prof.events())
                        outs[tokens] = {"out": [t.clone() for t in (out if isinstance(out, tuple) else (out,))],
                                        "fused_ops": fused,
                                        "events": collective_events(prof), "communicator": dict(calls),
                                        "paths": sorted({path for _, path, _ in fcpass.decision_counts()})}
                runs[label] = outs
                if pass_ is not None:
                    runs["report"] = pass_.last_report.rows() if pass_.last_report else None
            results[family, form, matmul] = {"report": runs["report"],
                "per_tokens": {tokens: {"fused_ops": runs["with"][tokens]["fused_ops"],
                    "same_bits": all(torch.equal(a, b) and a.dtype == b.dtype for a, b in
                                     zip(runs["with"][tokens]["out"], runs["without"][tokens]["out"], strict=True)),
                    **{f"{key}_{label}": runs[label][tokens][key] for key in ("events", "communicator", "paths")
                       for label in ("with", "without")}} for tokens in TOKENS}}
    return results


@pytest.fixture(scope="module", params=["loaded", *vllm_kernels.forceable_builds()])
def runs(request):
    """Ranks of their own, with the kernel library vLLM loads on this CPU, then each other build it can run."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in (vllm_kernels.forced_env(request.param) if request.param != "loaded" else {}).items():
            env.setenv(key, value)
        per_rank = run_ranks(run_below_threshold, 2, timeout=600, setup=rank_setup)
    if request.param != "loaded":  # what makes this run the other build's
        assert {r["kernels"] for r in per_rank} == {vllm_kernels.LIBRARIES[request.param]}, per_rank[0]["kernels"]
    return per_rank


@pytest.mark.parametrize("family, form, matmul", sorted(set(_cases(shm=True)) | set(_cases(shm=False))))
def test_below_the_threshold_the_fused_op_runs_the_sites_own_ops(runs, family, form, matmul):
    if (family, form, matmul) not in runs[0]:  # not a site of this build (see _cases)
        assert (family, form, matmul) not in _cases(runs[0]["shm"])
        return
    for rank, r in enumerate(runs):
        result = r[family, form, matmul]
        # the fused op ran (read from the run: a graph served by Inductor's cache ran no pass)
        fused_ops = {t: run["fused_ops"] for t, run in result["per_tokens"].items()}
        assert fused_ops == dict.fromkeys(TOKENS, 1), (rank, result["report"])
        for tokens, run in result["per_tokens"].items():
            where = (rank, r["kernels"], tokens)
            assert run["paths_with"] == ["unfused"] and run["paths_without"] == [], where
            assert run["same_bits"], where
            assert run["events_with"] == run["events_without"] and run["events_without"], (where, run)
            assert run["communicator_with"] == run["communicator_without"], (where, run)
            if form == "vllm":  # vLLM's ops run through its device communicator
                assert run["communicator_without"], where
