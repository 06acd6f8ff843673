"""vllm-ascend's FlashComm v1 collectives (``vllm.maybe_pad_and_reduce`` and
``vllm.maybe_all_gather_and_maybe_unpad``), on 2 real ranks with vLLM's TP group.

The ops are stand-ins (tests/standins/ascend) with vllm-ascend's qualified
names, semantics and fakes; they talk on vLLM's real TP group. Both take
their group and padding from vLLM/vllm-ascend state rather than arguments,
so the pass reads the TP group at compile time and the fused op reads
``pad_size`` at run time, as the originals do. Unverified on Ascend hardware.
"""

import copy
import sys
from pathlib import Path

import torch

from support.multirank import shared
from devtools.vllm_cpu import rank_setup, vllm_tp

THRESHOLD = 16
STANDIN = str(Path(__file__).parent.parent / "standins" / "ascend")


def _graphs(rank):
    import vllm_ascend.register_custom_ops  # noqa: F401  (the stand-in ops)
    from torch.fx.experimental.proxy_tensor import make_fx

    from support.hand_graphs import K, N

    def rs(x, w, b):
        y = torch.addmm(b, x, w.t()) if rank == 0 else torch.mm(x, w.t())  # rank-0-only row-parallel bias
        return torch.relu(torch.ops.vllm.maybe_pad_and_reduce(y))

    def ag(x, w1, w2):
        g = torch.ops.vllm.maybe_all_gather_and_maybe_unpad(x, True)
        return torch.mm(g, w1.t()), torch.mm(g, w2.t()), g + 1

    traced_rs = make_fx(rs, tracing_mode="symbolic")(torch.randn(15, K), torch.randn(N, K), torch.randn(N))
    traced_ag = make_fx(ag, tracing_mode="symbolic")(torch.randn(8, K), torch.randn(N, K), torch.randn(N + 1, K))
    return traced_rs, traced_ag


def ascend_setup():
    """vLLM's rank setup plus the vllm-ascend stand-in on the path: ranks of their own (the stand-in's ops stay)."""
    sys.path.insert(0, STANDIN)
    rank_setup()


def run_ascend_forms(rank, world_size):
    import fcpass
    from passes import FlashCommPass
    from vllm_ascend.ascend_forward_context import set_tokens

    from support.hand_graphs import K, N, count

    results = {}
    with vllm_tp(rank, world_size):
        set_tokens(16, world_size)  # FlashComm on while tracing, as vllm-ascend decides per compile
        originals = dict(zip(("rs", "ag"), _graphs(rank)))
        g = torch.Generator().manual_seed(rank)
        w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        w1, w2 = torch.randn(N, K), torch.randn(N + 1, K)
        for name, original in originals.items():
            rewritten = copy.deepcopy(original)
            flashcomm = FlashCommPass(fcpass.PassConfig(threshold_tokens=THRESHOLD))
            flashcomm(rewritten.graph)
            rewritten.recompile()
            results[name] = {"matched": flashcomm.matched, "ops": {
                op: count(rewritten, getattr(torch.ops.fcpass, op).default)
                for op in ("mm_reduce_scatter", "all_gather_mm", "drop_token_padding")}}
            # padded to 8 (unfused) and 64 (fused); odd counts pad one row; then FlashComm off in the forward, as
            # vllm-ascend switches it per forward: all_reduce for the scatter, the local rows for the gather
            for tokens, flash_comm in [(n, True) for n in (7, 8, 63, 64)] + [(n, False) for n in (7, 64)]:
                set_tokens(tokens, world_size, enabled=flash_comm)
                padded = tokens + (-tokens) % world_size
                x = torch.randn(tokens, K, generator=torch.Generator().manual_seed(tokens))
                shard = torch.randn(padded // world_size, K) if flash_comm else x
                args = (x, w, b) if name == "rs" else (shard, w1, w2)
                fcpass.reset_decision_counts()
                got, want = rewritten(*args), original(*args)
                got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
                assert all(a.shape == e.shape for a, e in zip(got, want)), (name, tokens)
                results[name][tokens if flash_comm else ("off", tokens)] = {
                    "error": max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(got, want)),
                    "decisions": fcpass.decision_counts(), "rows": want[0].shape[0]}
    return results


ASCEND_FORMS = shared(run_ascend_forms, setup=ascend_setup, timeout=240)


def test_vllm_ascend_flashcomm_collectives_fuse_and_match_the_originals():
    per_rank = ASCEND_FORMS()
    for rank, results in enumerate(per_rank):
        matmul_form = "addmm" if rank == 0 else "mm"
        assert results["rs"]["matched"] == {"mm_reduce_scatter": {f"vllm_ascend/{matmul_form}": 1}}
        assert results["rs"]["ops"] == {"mm_reduce_scatter": 1, "all_gather_mm": 0, "drop_token_padding": 0}
        assert results["ag"]["matched"] == {"all_gather_mm": {"vllm_ascend/mm": 1}}
        # the padding is dropped from both matmul results and from the gathered rows' other user
        assert results["ag"]["ops"] == {"mm_reduce_scatter": 0, "all_gather_mm": 1, "drop_token_padding": 3}
        for name in ("rs", "ag"):
            for tokens in (7, 8, 63, 64):
                r = results[name][tokens]
                assert r["error"] <= 1e-5, (name, tokens, r["error"])
                (path,) = {p for (_, p, _) in r["decisions"]}
                assert path == ("fused" if tokens > THRESHOLD else "unfused"), (name, tokens)
        assert results["ag"][7]["rows"] == 7 and results["rs"][7]["rows"] == 4  # unpadded / padded then scattered
        for tokens in (7, 64):  # FlashComm off in the forward: all rows everywhere, the numbers of the original
            off_rs, off_ag = results["rs"][("off", tokens)], results["ag"][("off", tokens)]
            assert off_rs["rows"] == off_ag["rows"] == tokens
            assert off_rs["error"] <= 1e-5 and off_ag["error"] <= 1e-5, (off_rs, off_ag)
            (decision,) = off_rs["decisions"]  # the scatter's site ran as matmul -> all_reduce
            assert decision[1] == ("fused" if tokens > THRESHOLD else "unfused"), decision
            assert off_ag["decisions"] == {}  # no gather, no collective
    for name in ("rs", "ag"):
        for tokens in (7, 8, 63, 64, ("off", 7), ("off", 64)):
            assert per_rank[0][name][tokens]["decisions"] == per_rank[1][name][tokens]["decisions"]
