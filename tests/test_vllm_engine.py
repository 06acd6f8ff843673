"""The real engine: ``vllm.LLM(tensor_parallel_size=2)`` on CPU with fcpass turned on the way a user does.

These are the demo's runs (``make demo``): each engine in its own process
(``python -m fcpass.engine``), with a deadline. Expectation per worker from the model: see
tests/engine_expectations.py. Prefills of 40 and 100 tokens (above the threshold 16, even) take the fused path,
5 tokens the unfused one. Greedy ids equal the engine without fcpass.
"""

import pytest

from engine_expectations import FCPASS, THRESHOLD, WORKER_REPORT, sorted_rows
from fcpass import demo, engine
from fcpass.engine import LAYERS, PROMPT_LENGTHS
from passes.report import SPLIT


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """The demo's two engines (README's first command), each in its own process with a deadline."""
    model_dir = engine.write_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))
    return engine.run_both(model_dir, FCPASS, PROMPT_LENGTHS, timeout=480)


def test_same_greedy_tokens_as_without_fcpass(engine_runs):
    assert engine_runs["fcpass"]["ids"] == engine_runs["plain"]["ids"]
    assert all(len(ids) == 8 for ids in engine_runs["plain"]["ids"])


def test_workers_split_every_all_reduce_and_fuse_two_sites_each_way_per_layer(engine_runs):
    reports = engine_runs["fcpass"]["reports"]
    assert len(reports) == 2  # one per worker
    for worker_reports in reports:
        assert sorted_rows(worker_reports[-1]) == WORKER_REPORT


def test_prefills_above_the_threshold_took_the_fused_path(engine_runs):
    for n, per_worker in zip(PROMPT_LENGTHS, engine_runs["fcpass"]["decisions"]):
        path = "fused" if n > THRESHOLD else "unfused"
        for counts in per_worker:
            assert counts == {f"mm_reduce_scatter_onednn/{path}": 2 * LAYERS,
                              f"all_gather_onednn_mm/{path}": 2 * LAYERS}, n
    assert engine_runs["plain"]["reports"] == [[], []]


def test_demo_prints_report_decisions_tokens_and_times(engine_runs):
    out = demo.render(engine_runs, FCPASS, PROMPT_LENGTHS)
    assert "Why-not-fused report (worker 0; worker 1 the same)" in out
    assert "no matmul producer" in out and "no matmul consumer" in out and SPLIT in out
    assert "all greedy tokens equal: yes" in out and "DIFFERENT" not in out and "disagree" not in out
    assert "mm_reduce_scatter_onednn/unfused x4" in out and "mm_reduce_scatter_onednn/fused x4" in out
    assert "engine start s (without / with)" in out
