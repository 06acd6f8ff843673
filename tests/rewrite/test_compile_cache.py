"""Inductor's compile caches as users have them (on, one cache dir for every process of the machine).

A cache hit skips every post-grad pass, FlashCommPass included, so the
compiled graph must carry what its fused ops read at run time. Two gloo
ranks share one cache dir; each config is compiled in a cold run (the rank
that compiles second may hit the entry the first just wrote) and again in a
warm run of new processes (every rank hits). In both, every rank must make
the decisions its config says, at the chunk count it says, with the
reference's numbers, and nothing may hang (every run has a deadline).
"""

import json

import pytest
import torch
import torch.distributed as dist

from fcpass import thresholds
from devtools.launch import run_ranks

# 4096 tokens: above the generic backend's defaults (512 and 2048), so the defaults fuse and every other
# config below differs from them in a decision or a chunk count (what a process that lost its config shows).
M, K, N = 4096, 32, 48


def _table(path) -> str:
    """mm_reduce_scatter above 8192 tokens only (unfused here); all_gather_mm above 8, in 2 chunks."""
    entries = [thresholds.entry_dict("mm_reduce_scatter", 2, torch.float32, K, N, threshold_tokens=8192),
               thresholds.entry_dict("all_gather_mm", 2, torch.float32, N, K, threshold_tokens=8, pipeline_chunks=2)]
    path.write_text(json.dumps(thresholds.table_dict("generic", entries)))
    return str(path)


def _configs(table_path: str) -> dict:
    """name: (PassConfig fields, the (op, path, pipeline chunks) every rank must plan under it)."""
    ops = ("all_gather_mm", "mm_reduce_scatter")
    return {
        "off": ({"backend": "off", "threshold_tokens": 0}, {(op, "unfused", 0) for op in ops}),
        "defaults": ({}, {(op, "fused", 0) for op in ops}),
        "table": ({"threshold_table": table_path},
                  {("mm_reduce_scatter", "unfused", 0), ("all_gather_mm", "fused", 2)}),
        "chunks": ({"threshold_tokens": 0, "pipeline_chunks": 3}, {(op, "fused", 3) for op in ops}),
    }


def layer(x, w_row, w_col, group_name, world_size):
    """A row-parallel matmul's reduce_scatter, then a column-parallel matmul of the gathered rows."""
    from torch.distributed import _functional_collectives as funcol

    shard = funcol.reduce_scatter_tensor(x @ w_row, "sum", 0, group_name)
    return funcol.all_gather_tensor(torch.relu(shard), 0, group_name) @ w_col


def reference(x, w_row, w_col, world_size):
    product = x.double() @ w_row.double()
    shard = product.new_empty((product.shape[0] // world_size, product.shape[1]))
    dist.reduce_scatter_tensor(shard, product)
    gathered = shard.new_empty(product.shape)
    dist.all_gather_into_tensor(gathered, torch.relu(shard))
    return gathered @ w_col.double()


def compile_each_config(rank, world_size, configs):
    """Each config's compiled layer once (fresh Dynamo state): its plans, error, and whether the pass ran."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    import logging

    import fcpass
    from fcpass import dispatch
    from passes import FlashCommPass

    said = []  # fcpass.dispatch's lines: a graph with fcpass's ops runs in this process
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("fcpass.dispatch").addHandler(handler)
    logging.getLogger("fcpass.dispatch").setLevel(logging.INFO)

    group_name = dist.group.WORLD.group_name
    g = torch.Generator().manual_seed(rank)
    x, w_row = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    w_col = torch.randn(N, K, generator=torch.Generator().manual_seed(99))
    want = reference(x, w_row, w_col, world_size)
    results = {}
    for name, (fields, _) in configs.items():
        torch._dynamo.reset()
        counters.clear()
        dispatch._plans.clear()
        said.clear()
        flashcomm = FlashCommPass(fcpass.PassConfig.from_dict(fields))
        with inductor_config.patch({"post_grad_custom_post_pass": flashcomm}), torch.no_grad():
            got = torch.compile(layer, fullgraph=True)(x, w_row, w_col, group_name, world_size)
        results[name] = {
            "plans": sorted({(key[0], plan.decision.path, plan.pipeline_chunks) for key, plan in dispatch._plans.items()}),
            "error": ((got - want).abs().max() / want.abs().max()).item(),
            "pass_ran": bool(flashcomm.last_report.outcomes),
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"],
            "said": list(said),
        }
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A cold run, then a warm run in new processes, both ranks of each sharing one fresh cache dir."""
    cache_dir = tmp_path_factory.mktemp("inductor-cache")
    configs = _configs(_table(tmp_path_factory.mktemp("table") / "thresholds.json"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
        env.delenv("TORCHINDUCTOR_FX_GRAPH_CACHE", raising=False)  # torch's default: on
        env.delenv("TORCHINDUCTOR_AUTOGRAD_CACHE", raising=False)
        cold = run_ranks(compile_each_config, 2, configs, timeout=300)
        warm = run_ranks(compile_each_config, 2, configs, timeout=300)
    return configs, cold, warm


@pytest.mark.parametrize("phase", ["cold", "warm"])
def test_every_rank_runs_the_config_it_was_compiled_with(runs, phase):
    configs, cold, warm = runs
    for rank, per_config in enumerate(cold if phase == "cold" else warm):
        for name, (_, want_plans) in configs.items():
            r = per_config[name]
            assert {tuple(p) for p in r["plans"]} == want_plans, (phase, rank, name)
            assert r["error"] <= 1e-5, (phase, rank, name)


def test_the_warm_run_is_served_from_the_cache_without_the_pass(runs):
    """What makes the warm run a test of the cache: no rank compiled, so none of its configs came from the pass."""
    configs, cold, warm = runs
    assert any(r[name]["pass_ran"] for r in cold for name in configs)
    for per_config in warm:
        for name in configs:
            assert per_config[name]["cache_hits"] >= 1 and not per_config[name]["pass_ran"], name


def test_a_graph_from_the_cache_says_it_runs_fcpass_ops_and_their_config(runs):
    """The pass says nothing on a cache hit (it never runs): the ops' first call does, once per config."""
    import fcpass

    configs, _, warm = runs
    for per_config in warm:
        for name, (fields, _) in configs.items():
            (line,) = per_config[name]["said"]
            assert line.startswith("fcpass: this process runs a compiled graph with fcpass's fused ops") and (
                fcpass.PassConfig.from_dict(fields).runtime_text() in line), (name, line)


def test_configs_in_one_process_do_not_collide(runs):
    """The four configs compiled one after another in one process: each kept its own decisions and chunk
    counts, whichever compiled last."""
    configs, cold, _ = runs
    plans = {name: {tuple(p) for p in cold[0][name]["plans"]} for name in configs}
    assert plans == {name: want for name, (_, want) in configs.items()}
