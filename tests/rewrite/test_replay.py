"""The committed captures (tests/data/captures, ``make captures``) replay as expected where vLLM, vllm-ascend
and torch_npu cannot be imported; a capture that cannot be used is exit 2 and one line, never a traceback;
``--numerics`` runs the engine capture's fused sites. A capture replays only on the torch major.minor that
wrote it: the CPU engine's and the TP=8 one here (torch 2.13, the main virtualenv), vllm-ascend's on its own
stacks (torch 2.10: ``make test-ascend023`` / ``test-ascend030`` run the committed-replay test too)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fcpass import numerics
from support import replays

COMMITTED = sorted(path.name[: -len(".expected.json")] for path in replays.DATA.glob("*.expected.json"))
WRITTEN_BY_THIS_TORCH = [name for name in COMMITTED if replays.torch_of(name) == replays.torch_major_minor()]


def test_the_committed_captures_are_the_ones_the_docs_name():
    assert COMMITTED == ["engine_tp2_avx2", "vllm_ascend_tp2", "vllm_llama_tp8"]
    assert {name: replays.torch_of(name) for name in COMMITTED} == {
        "engine_tp2_avx2": "2.13", "vllm_ascend_tp2": "2.10", "vllm_llama_tp8": "2.13"}


@pytest.mark.parametrize("name", WRITTEN_BY_THIS_TORCH)
def test_a_committed_capture_replays_as_expected(name, tmp_path):
    folder = shutil.copytree(replays.DATA / name, tmp_path / name)
    done, results = replays.replay(folder, "--expect", str(replays.DATA / f"{name}.expected.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    graphs = results["graphs"]
    assert all(graph["problems"] == [] for graph in graphs)
    assert any(op.startswith("fcpass.") for graph in graphs for op in graph["ops_after"])
    if name == "vllm_llama_tp8":  # eight ranks' graphs, one process
        assert sorted(graph["rank"] for graph in graphs) == list(range(8))
        assert {graph["world_size"] for graph in graphs} == {8}


def test_another_config_replays_with_its_own_decisions(tmp_path):
    folder = shutil.copytree(replays.DATA / "engine_tp2_avx2", tmp_path / "captures")
    done, results = replays.replay(folder, "--config", json.dumps({"fuse_all_gather_mm": False}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for graph in results["graphs"]:
        assert "fcpass.all_gather_onednn_mm.default" not in graph["ops_after"]
        assert graph["ops_after"]["fcpass.mm_reduce_scatter_onednn.default"] == 4


def _one_capture(tmp_path):
    """A copy of one committed capture with vLLM's all_reduce sites (rank 0 of vLLM's Llama at TP=8)."""
    source = sorted((replays.DATA / "vllm_llama_tp8").glob("r0-*"))[0]
    assert "vllm.all_reduce.default" in json.loads((source / "capture.json").read_text())["ops_before"]
    return shutil.copytree(source, tmp_path / "captures" / source.name)


def _edit_facts(capture, edit):
    facts = json.loads((capture / "capture.json").read_text())
    edit(facts)
    (capture / "capture.json").write_text(json.dumps(facts))


BAD_CAPTURES = {
    "truncated graph": (lambda c: (c / "graph.pkl").write_bytes((c / "graph.pkl").read_bytes()[:1000]),
                        "graph.pkl cannot be loaded"),
    "unfinished": (lambda c: (c / "capture.json").unlink(), "no capture.json (the capture did not finish)"),
    "truncated facts": (lambda c: (c / "capture.json").write_text((c / "capture.json").read_text()[:200]),
                        "capture.json is not JSON"),
    "another torch": (lambda c: _edit_facts(c, lambda f: f["versions"].update(torch="2.9.1")),
                      "captured with torch 2.9.1"),
    "a missing group": (lambda c: _edit_facts(c, lambda f: f["process"]["groups"].clear()),
                        "the capture does not record groups"),
}


@pytest.mark.parametrize("case", sorted(BAD_CAPTURES))
def test_a_bad_capture_is_exit_2_and_one_line(case, tmp_path):
    capture = _one_capture(tmp_path)
    damage, says = BAD_CAPTURES[case]
    damage(capture)
    done, _ = replays.replay(capture.parent)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_op_whose_schema_changed_is_exit_2_and_one_line(tmp_path):
    """A library loaded in the replaying process whose op no longer has the captured schema (a newer vLLM)."""
    capture = _one_capture(tmp_path)
    newer_vllm = ("import torch; lib = torch.library.Library('vllm', 'FRAGMENT'); lib.define("
                  "'all_reduce(Tensor tensor, str group_name, bool new) -> Tensor')")
    done, _ = replays.replay(capture.parent, first=newer_vllm)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "op vllm.all_reduce.default: its schema here" in done.stderr


def test_numerics_runs_every_fused_site_of_the_engine_capture_on_both_sides_of_its_threshold(tmp_path):
    """--numerics on the CPU engine's capture (vLLM installed: its oneDNN matmul packs the random weights): per
    rank 8 fused sites at 16 tokens (the threshold: the unfused path, the same bits as the site's own ops) and
    at 66 (the fused path, within float32's tolerance)."""
    folder = shutil.copytree(replays.DATA / "engine_tp2_avx2", tmp_path / "captures")
    out = tmp_path / "numerics.json"
    done = subprocess.run([sys.executable, "-m", "fcpass.replay", str(folder), "--numerics", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for graph in json.loads(out.read_text())["graphs"]:
        lines = graph["numerics"]
        assert len(lines) == 16 and all(line.startswith("ok ") for line in lines), lines
        assert sum("16 tokens (unfused expected, unfused taken): the same bits" in line for line in lines) == 8
        assert sum("66 tokens (fused expected, fused taken)" in line for line in lines) == 8


def test_numerics_says_failed_for_other_bits_another_path_or_a_larger_error():
    want = torch.ones(4, 4)
    assert numerics._verdict("op #0", 16, True, {"unfused"}, want + 1e-7, want).startswith("FAILED")
    assert numerics._verdict("op #0", 66, False, {"unfused"}, want, want).startswith("FAILED")
    assert numerics._verdict("op #0", 66, False, {"fused"}, want * (1 + 1e-3), want).startswith("FAILED")
    assert numerics._verdict("op #0", 66, False, {"fused"}, want * (1 + 1e-6), want).startswith("ok")


def test_capturing_changes_neither_the_rewrite_nor_the_pass_key(tmp_path, monkeypatch):
    """A capture run compiles what a run without it compiles: the same rewritten graph, the same cache key."""
    from passes.capture import CAPTURE_ENV
    from support.hand_graphs import apply_pass, mm_pad_rs

    plain = apply_pass(graph := mm_pad_rs("c10d_functional"))
    without = (str(graph.graph), plain.uuid())
    monkeypatch.setenv(CAPTURE_ENV, str(tmp_path))
    captured = apply_pass(graph := mm_pad_rs("c10d_functional"))
    assert (str(graph.graph), captured.uuid()) == without
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "capture.json").read_text())["report"] == captured.last_report.rows()
