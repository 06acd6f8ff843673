"""The prepared Ascend hardware check (fcpass/checks/ascend.py, ``make ascend-check``), run here as far as a CPU
allows: its kernel cases on 2 gloo ranks through the generic backend (its references, calls and table), and
its refusal to run without an NPU."""

import pytest
import torch

from fcpass.checks import ascend as ascend_check
from support.multirank import shared

TOKENS, THRESHOLD = (8, 64), 16
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 2e-2}
CPU_RUNS = {
    "world": shared(ascend_check.kernels_rank, TOKENS, "cpu", THRESHOLD, (256, 128), 1, timeout=240),
    # vllm-ascend's fine-grained TP groups across DP ranks: each case on this rank's group of 2 out of 4
    "fine-grained groups": shared(ascend_check.kernels_rank, TOKENS, "cpu", THRESHOLD, (256, 128), 1,
                                  ascend_check.FINE_GRAINED_GROUPS, world_size=4, timeout=240),
}


@pytest.mark.parametrize("where", CPU_RUNS)
def test_its_kernel_cases_give_the_reference_on_both_sides_of_the_threshold(where):
    per_rank = CPU_RUNS[where]()
    ops = {(r["op"], r["dtype"], r["w8a8"]) for r in per_rank[0]}
    # every op (Falcon's sum of products included) in two float dtypes; W8A8 per-tensor, and per-token where it
    # exists
    assert len(ops) == 4 * 2 + 5
    for rows in zip(*per_rank):
        assert len({(r["path"], r["reason"]) for r in rows}) == 1  # the same protocol on every rank
        for r in rows:
            assert r["path"] == ("fused" if r["tokens"] > THRESHOLD else "unfused"), r
            assert r["error"] <= TOLERANCE[r["dtype"]], r
    text = ascend_check.table(per_rank[0])
    assert text.splitlines()[0].split()[:4] == ["op", "dtype", "w8a8", "tokens"] and len(text.splitlines()) == 27


def test_without_an_npu_it_says_what_is_missing_and_runs_nothing(capsys, monkeypatch):
    import sys

    from support.npu_runs import STANDIN_DIR

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != STANDIN_DIR])  # other tests' torch_npu stand-in
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.delattr(torch, "npu", raising=False)  # the stand-in's torch.npu, as torch_npu registers it
    assert ascend_check.main([]) == 2
    assert "torch_npu is not installed" in capsys.readouterr().err
    assert not hasattr(torch, "npu")
