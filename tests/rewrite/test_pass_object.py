"""FlashCommPass as an object: uuid, copy, pickle, vLLM flavour, graph dumps."""

import copy
import json
import os
import pickle

import fcpass
from devtools.vllm_cpu import rank_setup
from support.hand_graphs import mm_rs
from support.multirank import shared
from passes import FlashCommPass


def uuid_in_fresh_process(rank, world_size):
    import fcpass
    import passes

    return passes.FlashCommPass(fcpass.PassConfig(threshold_tokens=77)).uuid()


# The vLLM tests' ranks: fresh interpreters (their own hash seed) that import vLLM, as vLLM's workers do.
UUIDS_IN_FRESH_PROCESSES = shared(uuid_in_fresh_process, setup=rank_setup, timeout=60)


def test_uuid_is_stable_across_processes_and_follows_the_config():
    here = FlashCommPass(fcpass.PassConfig(threshold_tokens=77)).uuid()
    assert UUIDS_IN_FRESH_PROCESSES() == [here, here]
    assert FlashCommPass(fcpass.PassConfig(threshold_tokens=78)).uuid() != here
    assert FlashCommPass(fcpass.PassConfig(threshold_tokens=77, fuse_all_gather_mm=False)).uuid() != here


def test_copy_and_pickle_keep_config_and_uuid():
    p = FlashCommPass(fcpass.PassConfig(threshold_tokens=123, backend="generic"))
    p(mm_rs().graph)
    for clone in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert type(clone) is type(p) and clone.config == p.config and clone.uuid() == p.uuid()


def test_vllm_gets_the_pass_as_its_managers_take_it_and_keeps_it_through_pickle():
    """The rewrite's pass is plain Inductor; vLLM's flavour (fcpass.vllm) is also a VllmInductorPass, also after
    the trip to vLLM's workers (deepcopy, pickle)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    import fcpass.vllm

    assert isinstance(FlashCommPass(), CustomGraphPass) and not isinstance(FlashCommPass(), VllmInductorPass)
    p = fcpass.vllm.make_pass({"threshold_tokens": 5})
    for clone in (p, copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert isinstance(clone, VllmInductorPass) and isinstance(clone, FlashCommPass)
        assert clone.config == p.config and clone.uuid() == FlashCommPass(p.config).uuid()


def test_debug_switch_dumps_graphs_before_and_after(tmp_path, monkeypatch):
    monkeypatch.setenv("FCPASS_DUMP_GRAPHS", str(tmp_path))
    FlashCommPass()(mm_rs().graph)
    files = {f.rsplit("_", 1)[1]: f for f in os.listdir(tmp_path)}
    assert sorted(files) == ["after.txt", "before.txt", "report.json"]
    before, after = (open(tmp_path / files[stage]).read() for stage in ("before.txt", "after.txt"))
    assert "vllm.reduce_scatter" in before and "fcpass.mm_reduce_scatter" in after
    with open(tmp_path / files["report.json"]) as f:
        assert json.load(f) == [["mm_reduce_scatter", "vllm/mm", "fused"]]
