"""The prepared GPU check (fcpass/checks/gpu.py, ``make gpu-check``), run here as far as a CPU allows: its parts
1 and 3 on 1 and 2 gloo ranks through the generic backend (cases, references, table), and what it says needs
a GPU."""

import math

import pytest

from fcpass.checks import gpu as gpu_check
from fcpass.checks import kernels as kernel_check

TOKENS = (8, 4096)  # below and above the generic backend's default thresholds on CPU
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 2e-2}


@pytest.fixture(scope="module")
def parts():
    return gpu_check.run(TOKENS, shape=(256, 128), repeats=1)


def test_without_a_gpu_it_runs_the_cpu_parts_and_says_which_need_one(parts):
    assert [title.split(",")[0].split(":")[0] for title in parts] == ["1. fcpass ops", "3. fcpass ops",
                                                                        "4. below the threshold"]
    assert "Needs a GPU: " in gpu_check.preamble(0) and "CUDA-graph capture" in gpu_check.preamble(0)


def test_below_the_threshold_the_op_at_a_vllm_site_is_that_site_bit_for_bit(parts):
    """Part 4 on gloo with vLLM's TP group: on a GPU the same rows come from vLLM's CUDA communicator, eager and
    captured."""
    (rows,) = [rows for title, rows in parts.items() if title.startswith("4.")]
    assert [r["tokens"] for r in rows] == list(gpu_check.DECODE_TOKENS)
    for r in rows:
        assert r["same_bits"] and r["vllm_site_ms"] > 0 and r["fcpass_op_ms"] > 0, r


def test_its_cases_give_the_reference_on_one_and_two_ranks(parts):
    cases = len(kernel_check.cases((None, None))) * len(TOKENS)
    for title, rows in ((title, rows) for title, rows in parts.items() if not title.startswith("4.")):
        assert len(rows) == cases, title
        for r in rows:
            assert r["error"] <= TOLERANCE[r["dtype"]], (title, r)
            assert r.get("ranks_agree", True), (title, r)
            assert r["path"] in ("fused", "unfused") and r["guarded_ms"] > 0 and r["unfused_ms"] > 0
            assert math.isnan(r["matmul_ms"]) == (r["w8a8"] != "-")
        # the generic backend's defaults on CPU tensors: reduce_scatter (after one product or a sum) fused above 512
        # tokens, all_gather above 2048, all_reduce never (the measured thresholds, benchmarks/README.md)
        fused = {(r["op"], r["tokens"]) for r in rows if r["path"] == "fused"}
        assert fused == {("mm_reduce_scatter", 4096), ("mm_sum_reduce_scatter", 4096), ("all_gather_mm", 4096)}, (
            title, fused)
    text = kernel_check.table(next(iter(parts.values())))
    assert text.splitlines()[0].split()[:4] == ["op", "dtype", "w8a8", "tokens"]
