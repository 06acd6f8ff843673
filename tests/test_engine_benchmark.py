"""benchmarks/engine.py's pure parts: the plan, points from a run, ratios to "off", the serve summary, the table.

No engine starts here: runs are written out by hand in the shape
fcpass/engine_run.py returns.
"""

import pytest

from benchmarks import engine as bench
from benchmarks import serve_load
from fcpass import engine_run


def _call(metric, tokens, batch, max_tokens, median_ms, comm_ms):
    return {"metric": metric, "tokens": tokens, "batch": batch, "max_tokens": max_tokens, "median_ms": median_ms,
            "samples_ms": [median_ms], "profiled_ms": median_ms, "decisions": [{}, {}],
            "comm_ms_by_op": [{"_c10d_functional::wait_tensor": comm_ms}, {"_c10d_functional::wait_tensor": comm_ms}]}


def _run(prefill_ms, decode_ms):
    return {"calls": [_call("prefill_ms", 1024, 1, 1, prefill_ms, 20.0),
                      _call("decode_ms_per_step", 64, 8, 1, 50.0, 5.0),
                      _call("decode_ms_per_step", 64, 8, 9, 50.0 + 8 * decode_ms, 5.0 + 8 * 2.0)]}


def test_quick_settings_and_plan():
    args = bench.parse_args(["--quick", "--configs", "defaults"])
    assert args.settings["configs"] == ("off", "defaults") and args.out.endswith("engine_quick.json")
    plan = bench.plan(args.settings)
    assert [c["name"] for c in plan["calls"]][:2] == ["prefill 256", "prefill 8x32"]
    assert all(sum(c["prompts"]) == c["tokens"] for c in plan["calls"] if c["metric"] == "prefill_ms")
    assert plan["engine_args"]["max_model_len"] > max(args.settings["prefill_tokens"])
    assert bench.deadline_s(plan) > bench.START_S
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])


def test_config_table_is_the_issues():
    assert bench.CONFIGS["off"] is None and bench.CONFIGS["defaults"] == {}
    assert bench.CONFIGS["demo"] == {"threshold_tokens": 16, "sequence_parallel": True,
                                     "sequence_parallel_threshold_tokens": 1}


def test_points_ratios_and_comm_free_ceiling():
    points = bench.llm_points("gloo", "off", _run(100.0, 10.0)) + bench.llm_points("gloo", "sp", _run(80.0, 8.0))
    points += bench.serve_points("gloo", "off", {"throughput_tok_s": 50.0, "requests": 4, "tokens": 64,
                                                 "concurrency": 4, "ttft_ms": {"p50": 10.0}, "itl_ms": {"p50": 2.0}})
    points = bench.add_ratios(points)
    off_prefill, off_decode, sp_prefill, sp_decode = points[0], points[1], points[2], points[3]
    assert off_decode["value"] == pytest.approx(10.0) and off_decode["comm_ms"] == pytest.approx(2.0)
    assert off_prefill["comm_share"] == pytest.approx(0.2)
    assert off_prefill["comm_free_speedup"] == pytest.approx(100 / 80)
    assert sp_prefill["ratio_to_off"] == pytest.approx(0.8) and sp_prefill["speedup_vs_off"] == pytest.approx(1.25)
    assert sp_decode["speedup_vs_off"] == pytest.approx(1.25)
    assert points[-1]["ratio_to_off"] == 1 and points[-1]["comm_ms"] is None
    text = bench.table(points, ("off", "sp"))
    assert "| gloo | prefill 1024 | 100.0 | 20.0 (20 %) | 1.25x | 80.0 (1.25x) |" in text


def test_percentiles_and_serve_summary():
    assert serve_load.percentile([3, 1, 2], 50) == 2 and serve_load.percentile([0, 10], 90) == pytest.approx(9)
    load = {"wall_s": 2.0, "concurrency": 2, "records": [{"ttft_s": 0.1, "gaps_s": [0.01, 0.03], "tokens": 3},
                                                         {"ttft_s": 0.3, "gaps_s": [0.02], "tokens": 2}]}
    summary = serve_load.summary(load)
    assert summary["throughput_tok_s"] == pytest.approx(2.5)
    assert summary["ttft_ms"]["p50"] == pytest.approx(200) and summary["itl_ms"]["p50"] == pytest.approx(20)


def test_comm_ops_are_the_collectives_and_fused_ops():
    assert all(engine_run.comm_op(n) for n in ("_c10d_functional::wait_tensor", "_C::shm_allreduce",
                                                 "fcpass::mm_reduce_scatter_onednn", "c10d::send"))
    assert not any(engine_run.comm_op(n) for n in ("gloo:all_reduce", "_C::onednn_mm", "aten::mm"))
