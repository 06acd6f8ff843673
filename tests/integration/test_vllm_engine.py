"""The real engine: ``vllm.LLM(tensor_parallel_size=2)`` on CPU with fcpass turned on the way a user does.

These are the demo's runs (``make demo``, ``--config showcase`` and the default ``--config defaults``): each
engine in its own process
(``python -m devtools.engine``), with a deadline, the compile caches on (one
fresh vLLM cache dir per kernel build, shared by every engine of it). Per kernel
library (tests/support/vllm_kernels.py): the one vLLM loads on this CPU, and its AVX2
build, forced. The loaded library's fcpass engine runs the defaults
(``PassConfig()``: they must do no harm whatever the transport), the AVX2
build's the showcase config (gloo all_reduce: split and fused), which also
starts a second time on the warm cache, where the pass may not run and the
cached graph's fused ops must behave as compiled.
Expectation per worker from the model and the all_reduce's transport: see
tests/support/engine_expectations.py. Prefills of 40 and 100 tokens (above the
threshold 16, even) take the fused path under the showcase config, 5 tokens
the unfused one; under the defaults every size takes the plain path. Greedy
ids equal the engine without fcpass.
"""

import json

import pytest

from support import replays, vllm_kernels
from support.engine_expectations import (DEFAULTS, FCPASS, THRESHOLD, fused_ops_per_prefill, sorted_rows,
                                         worker_report)
from devtools import engine
from examples import demo
from devtools.engine import PROMPT_LENGTHS
from passes.capture import CAPTURE_ENV
from passes.report import NO_MATMUL_CONSUMER, NO_MATMUL_PRODUCER, SPLIT

pytestmark = pytest.mark.e2e

ENGINE_TIMEOUT_S = 480
KERNELS = ("loaded", "avx2")
CONFIG = {"loaded": DEFAULTS, "avx2": FCPASS}  # the fcpass engine's PassConfig fields per kernel library


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return engine.write_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


def _fresh_caches(folder) -> dict:
    """vLLM's compile cache (its AOT-compiled model, Inductor's cache dir inside it) in ``folder``: cold at first."""
    return {"VLLM_CACHE_ROOT": str(folder / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor")}


@pytest.fixture(scope="module")
def engine_runs(model_dir, tmp_path_factory):
    """{kernels: {"plain", "fcpass", "fcpass_warm": results}, "expected_all_reduce": {kernels: form},
    "captures": {kernels: the folder FCPASS_CAPTURE filled in the cold fcpass engine's workers}}."""
    captures = {kernels: tmp_path_factory.mktemp(f"captures-{kernels}") for kernels in KERNELS}
    envs = {kernels: {**_fresh_caches(tmp_path_factory.mktemp(f"caches-{kernels}")),
                      **(vllm_kernels.avx2_env() if kernels == "avx2" else {})} for kernels in KERNELS}
    capturing = {kernels: {**envs[kernels], CAPTURE_ENV: str(captures[kernels])} for kernels in KERNELS}
    # The AVX2 build's pair first; then, three at once (four fail to start on 2 cores), the loaded build's pair
    # and the warm start on the cache the AVX2 fcpass engine wrote. Only the cold fcpass engines capture (the
    # engine without fcpass runs no pass, so it writes nothing either).
    runs = {"avx2": engine.run_both(model_dir, CONFIG["avx2"], PROMPT_LENGTHS, ENGINE_TIMEOUT_S, capturing["avx2"])}
    second = engine.run_all(model_dir, {"plain": (None, envs["loaded"]),
                                        "fcpass": (CONFIG["loaded"], capturing["loaded"]),
                                        "warm": (FCPASS, envs["avx2"])}, PROMPT_LENGTHS, ENGINE_TIMEOUT_S)
    runs["loaded"] = {"plain": second["plain"], "fcpass": second["fcpass"]}
    runs["avx2"]["fcpass_warm"] = second["warm"]
    runs["expected_all_reduce"] = {"loaded": vllm_kernels.all_reduce_form(), "avx2": "c10d_functional"}
    runs["captures"] = captures
    return runs


@pytest.mark.parametrize("kernels", KERNELS)
def test_same_greedy_tokens_as_without_fcpass(engine_runs, kernels):
    runs = engine_runs[kernels]
    assert runs["fcpass"]["ids"] == runs["plain"]["ids"]
    assert all(len(ids) == 8 for ids in runs["plain"]["ids"])


@pytest.mark.parametrize("kernels", KERNELS)
def test_workers_split_and_fuse_where_the_all_reduce_transport_lets_it_pay(engine_runs, kernels):
    runs, form = engine_runs[kernels], engine_runs["expected_all_reduce"][kernels]
    assert runs["plain"]["all_reduce"] == runs["fcpass"]["all_reduce"] == [form, form]
    reports = runs["fcpass"]["reports"]
    assert len(reports) == 2 and any(reports)  # one list per worker
    for worker_reports in reports:  # a worker may have hit the entry the other just wrote (shared cache dir)
        assert all(sorted_rows(rows) == worker_report(form, CONFIG[kernels]) for rows in worker_reports)


def _assert_prefill_decisions(decisions, all_reduce_form, fields=FCPASS):
    for n, per_worker in zip(PROMPT_LENGTHS, decisions):
        expected = fused_ops_per_prefill(all_reduce_form, "fused" if n > THRESHOLD else "unfused", fields)
        assert per_worker == [expected, expected], n


@pytest.mark.parametrize("kernels", KERNELS)
def test_prefills_above_the_threshold_took_the_fused_path(engine_runs, kernels):
    _assert_prefill_decisions(engine_runs[kernels]["fcpass"]["decisions"], engine_runs["expected_all_reduce"][kernels],
                              CONFIG[kernels])
    assert engine_runs[kernels]["plain"]["reports"] == [[], []]


def test_a_warm_start_runs_the_cached_graph_as_compiled(engine_runs):
    """The second start, on the caches the first wrote: the fused ops decide by the config they were compiled
    with, with the same tokens. Whether the pass ran is read (a worker's report), never assumed from whether
    vLLM compiled: a worker that loaded vLLM's AOT-compiled model, or whose recompile a compile cache served,
    ran no pass (vLLM 0.31/0.32 on CPU cannot load their own artifact and compile again, and the pass may run
    again; on vLLM 0.23 Inductor's cache served the graph and it did not); either way the graph it runs has the
    fused ops, deciding as compiled."""
    runs = engine_runs["avx2"]
    cold, warm = runs["fcpass"], runs["fcpass_warm"]
    assert all(c["vllm/aot_artifacts_loaded"] == 0 and c["vllm/aot_compiles"] == 1 for c in cold["compile_cache"])
    for counts, reports in zip(warm["compile_cache"], warm["reports"]):
        assert counts["vllm/aot_artifacts_loaded"] + counts["vllm/aot_compiles"] == 1
        if counts["vllm/aot_artifacts_loaded"]:
            assert not reports, counts  # vLLM's artifact: no compile, no pass
    _assert_prefill_decisions(warm["decisions"], "c10d_functional")
    assert warm["ids"] == runs["plain"]["ids"]


def test_demo_prints_report_decisions_tokens_and_times(engine_runs):
    runs = engine_runs["avx2"]
    out = demo.render({"plain": runs["plain"], "showcase": runs["fcpass"]}, {"showcase": FCPASS}, PROMPT_LENGTHS)
    assert "workers ran it" in out and "the other differs" not in out and demo.WHY_CPU_GAINS_NOTHING in out
    assert NO_MATMUL_PRODUCER in out and NO_MATMUL_CONSUMER in out and SPLIT in out
    assert "all greedy tokens equal: yes" in out and "DIFFERENT" not in out and "disagree" not in out
    assert "mm_reduce_scatter_onednn/unfused x4" in out and "mm_reduce_scatter_onednn/fused x4" in out
    assert "engine start s (without / with)" in out


def test_demo_shows_the_defaults_next_to_the_showcase(engine_runs):
    """The demo's three engines: the reference, the defaults (the loaded build's run here) and the showcase."""
    loaded, avx2 = engine_runs["loaded"], engine_runs["avx2"]
    out = demo.render({"plain": loaded["plain"], "defaults": loaded["fcpass"], "showcase": avx2["fcpass"]},
                      {"defaults": DEFAULTS, "showcase": FCPASS}, PROMPT_LENGTHS)
    assert "=== fcpass: PassConfig(), the defaults" in out and "=== fcpass: PassConfig(**" in out
    assert out.count("all greedy tokens equal: yes") == 2 and "disagree" not in out


def test_demo_says_when_the_graph_came_from_the_cache(engine_runs):
    runs = engine_runs["avx2"]
    cached = {**runs["fcpass"], "reports": [[], []]}  # what a start that loaded vLLM's artifact reports
    out = demo.render({"plain": runs["plain"], "showcase": cached}, {"showcase": FCPASS}, PROMPT_LENGTHS)
    assert demo.FROM_CACHE in out and "all greedy tokens equal: yes" in out
    assert "mm_reduce_scatter_onednn/fused x4" in out


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_workers_captures_replay_where_vllm_is_not_installed(engine_runs, kernels):
    """FCPASS_CAPTURE in the engine's environment (vLLM's workers inherit it): one capture per worker, which
    `python -m fcpass.replay` runs again in a process where vLLM cannot be imported: per rank the report the
    live worker logged, row for row, a well-formed rewritten graph, ranks agreeing; the AVX2 build's graph
    carries the fused ops afterwards."""
    captures = engine_runs["captures"][kernels]
    live = replays.live_reports(captures)
    worker_reports = [rows for worker in engine_runs[kernels]["fcpass"]["reports"] for rows in worker]
    assert len(live) == 2 and sorted(live.values()) == sorted(worker_reports)  # what the workers logged
    done, results = replays.replay(captures)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for graph in results["graphs"]:
        assert graph["world_size"] == 2 and graph["problems"] == []
        assert graph["report"] == live[graph["capture"]]
        fused = {op: n for op, n in graph["ops_after"].items() if op.startswith("fcpass.")}
        if kernels == "avx2":
            assert fused["fcpass.mm_reduce_scatter_onednn.default"] and fused["fcpass.all_gather_onednn_mm.default"]
    if kernels == "avx2":
        replays.keep_if_asked(captures, "engine_tp2_avx2")


def test_the_committed_engine_captures_are_what_this_vllm_compiles(engine_runs):
    """tests/data/captures/engine_tp2_avx2 (``make captures``) holds the graphs this vLLM hands the pass, op for
    op, per rank: the committed data cannot age silently."""
    fresh = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["ops_before"]
             for p in engine_runs["captures"]["avx2"].rglob("capture.json")}
    committed = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["ops_before"]
                 for p in (replays.DATA / "engine_tp2_avx2").rglob("capture.json")}
    assert committed == fresh
