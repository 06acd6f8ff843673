"""fcpass.vllm: the compilation config a vLLM user passes, vLLM's own registration code, the plugin."""

import copy
import pickle

import pytest
import torch

import fcpass
import fcpass.vllm as fcpass_vllm
from fcpass.vllm import POST_GRAD_PASS_KEY
from fcpass.vllm.compilation import _vllm_has_async_tp
from devtools.vllm_cpu import rank_setup
from support.multirank import shared
from support.vllm_backend import configure_post_pass
from passes import FlashCommPass

pytest.importorskip("vllm")


needs_async_tp = pytest.mark.skipif(not _vllm_has_async_tp(),
                                    reason="this vLLM has no SP/AsyncTP passes (>= 0.32)")
without_async_tp = pytest.mark.skipif(_vllm_has_async_tp(), reason="this vLLM has SP/AsyncTP (<= 0.31)")


def _installed(config) -> FlashCommPass:
    inductor = config["inductor_compile_config"] if isinstance(config, dict) else config.inductor_compile_config
    return inductor[POST_GRAD_PASS_KEY]


def test_compilation_config_carries_the_pass_through_vllms_config():
    from vllm.compilation.passes.inductor_pass import InductorPass
    from vllm.config import VllmConfig

    config = fcpass_vllm.compilation_config(fcpass.PassConfig(threshold_tokens=64))
    vllm_config = VllmConfig(compilation_config=config)
    flashcomm = _installed(vllm_config.compilation_config)
    assert isinstance(flashcomm, FlashCommPass) and isinstance(flashcomm, InductorPass)
    assert flashcomm.config.threshold_tokens == 64
    # vLLM's own compile-cache hash takes the pass and its config: another fcpass config, another cache entry
    other = VllmConfig(compilation_config=fcpass_vllm.compilation_config(fcpass.PassConfig(threshold_tokens=65)))
    assert _cache_hash(vllm_config) != _cache_hash(other)


def _cache_hash(vllm_config) -> str:
    """vLLM's compile-cache hash of a config: ``compute_hash()`` up to 0.33, ``hash_config`` of its
    ``compile_factors()`` from 0.34."""
    if hasattr(vllm_config, "compute_hash"):
        return vllm_config.compute_hash()
    from vllm.config.utils import hash_config

    return hash_config(vllm_config)


def test_base_is_copied():
    base = {"inductor_compile_config": {"max_autotune": False}, "mode": 3}
    config = fcpass_vllm.compilation_config({"threshold_tokens": 8}, base=base)
    assert config["inductor_compile_config"]["max_autotune"] is False and config["mode"] == 3
    assert base == {"inductor_compile_config": {"max_autotune": False}, "mode": 3}


@needs_async_tp
def test_async_tp_gives_way():
    from vllm.config import CompilationConfig

    base = {"pass_config": {"fuse_gemm_comms": True}, "inductor_compile_config": {"max_autotune": False}}
    config = fcpass_vllm.compilation_config({"threshold_tokens": 8}, base=base)
    assert config["pass_config"] == {"fuse_gemm_comms": False, "enable_sp": True}
    assert config["inductor_compile_config"]["max_autotune"] is False
    assert base == {"pass_config": {"fuse_gemm_comms": True}, "inductor_compile_config": {"max_autotune": False}}

    base_object = CompilationConfig(pass_config={"fuse_gemm_comms": True})
    merged = fcpass_vllm.compilation_config(base=base_object)
    assert isinstance(merged, CompilationConfig)
    assert (merged.pass_config.fuse_gemm_comms, merged.pass_config.enable_sp) == (False, True)
    assert POST_GRAD_PASS_KEY not in base_object.inductor_compile_config and base_object.pass_config.fuse_gemm_comms


SP_ON = {"sequence_parallel": True, "sequence_parallel_threshold_tokens": 512}


@without_async_tp
def test_fuse_gemm_comms_on_a_vllm_without_async_tp_names_the_users_field():
    """vLLM >= 0.32 has neither fuse_gemm_comms nor enable_sp: fcpass never hands vLLM a field it lacks, and an
    error names the field the user set (it used to be vLLM's error about enable_sp, a field nobody set)."""
    from vllm.config import CompilationConfig

    with pytest.raises(ValueError, match=r"^pass_config.fuse_gemm_comms: .*sequence_parallel=True") as error:
        fcpass_vllm.compilation_config({"threshold_tokens": 8}, base={"pass_config": {"fuse_gemm_comms": True}})
    assert "enable_sp" not in str(error.value)
    base = {"pass_config": {"fuse_gemm_comms": True, "fuse_act_quant": False}}
    config = fcpass_vllm.compilation_config(SP_ON, base=base)
    assert config["pass_config"] == {"fuse_act_quant": False}
    assert CompilationConfig(**config).pass_config.fuse_act_quant is False  # vLLM takes what is left


def test_sequence_parallel_threshold_becomes_a_compile_range_endpoint():
    """vLLM then compiles [1, 512] (left unsplit) apart from [513, max] (split): SP is decided per range."""
    from vllm.config import CompilationConfig, VllmConfig

    assert fcpass_vllm.compilation_config(SP_ON)["compile_ranges_endpoints"] == [512]
    merged = fcpass_vllm.compilation_config(SP_ON, base=CompilationConfig(compile_ranges_endpoints=[2048]))
    assert [(r.start, r.end) for r in merged.get_compile_ranges()] == [(1, 512), (513, 2048)]
    assert "compile_ranges_endpoints" not in fcpass_vllm.compilation_config({"threshold_tokens": 8})
    # from --additional-config: installed after vLLM computed its ranges, the endpoint is added to them (the
    # config made first, then the entry: whether vLLM loaded fcpass's plugin in this process is another test's)
    vllm_config = VllmConfig(compilation_config={"compile_ranges_endpoints": [2048]})
    vllm_config.additional_config = {"fcpass": SP_ON}
    assert fcpass_vllm.install_from_additional_config(vllm_config)
    assert vllm_config.compilation_config.compile_ranges_endpoints == [512, 2048]


@without_async_tp
def test_pass_cost_says_which_vllm_to_run_it_with():
    """benchmarks/pass_cost.py compares with vLLM 0.31's SP/AsyncTP passes: elsewhere it stops at once, saying so
    (it used to fail importing passes vLLM 0.32 removed)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "benchmarks.pass_cost", "--quick"],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert run.returncode == 1 and "run it with vLLM 0.31" in run.stderr, run.stderr[-2000:]


@needs_async_tp
def test_vllm_sequence_parallelism_and_fcpass_sequence_parallelism_never_both():
    with pytest.raises(ValueError, match="sequence_parallel: fcpass's and vLLM's sequence parallelism"):
        fcpass_vllm.compilation_config(SP_ON, base={"pass_config": {"enable_sp": True}})
    # AsyncTP asked for: it gives way to fcpass, and vLLM's SP stays off since fcpass splits the all_reduces
    config = fcpass_vllm.compilation_config(SP_ON, base={"pass_config": {"fuse_gemm_comms": True}})
    assert config["pass_config"] == {"fuse_gemm_comms": False}


def test_another_user_pass_or_a_second_differing_fcpass_is_refused():
    with pytest.raises(ValueError, match="already holds"):
        fcpass_vllm.compilation_config(base={"inductor_compile_config": {POST_GRAD_PASS_KEY: print}})
    once = fcpass_vllm.compilation_config({"threshold_tokens": 8})
    assert fcpass_vllm.compilation_config({"threshold_tokens": 8}, base=once)  # the same again is fine
    with pytest.raises(ValueError, match="configured twice"):
        fcpass_vllm.compilation_config({"threshold_tokens": 9}, base=once)


@pytest.mark.parametrize("bad, field", [({"threshold_tokens": -3}, "threshold_tokens"),
                                        ({"thresold_tokens": 3}, "thresold_tokens"),
                                        ({"backend": "tpu"}, "backend")])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        fcpass_vllm.compilation_config(bad)


def test_config_with_the_pass_deep_copies_and_pickles():
    from vllm.config import CompilationConfig

    for config in (fcpass_vllm.compilation_config({"threshold_tokens": 77}),
                   fcpass_vllm.compilation_config({"threshold_tokens": 77}, base=CompilationConfig())):
        original = _installed(config)
        for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
            flashcomm = _installed(copied)
            assert flashcomm is not original and type(flashcomm) is type(original)
            assert flashcomm.config == original.config and flashcomm.uuid() == original.uuid()


def test_inductor_cache_key_changes_with_the_threshold():
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import compiled_fx_graph_hash

    gm = torch.fx.symbolic_trace(lambda x, w: torch.mm(x, w))
    inputs = [torch.randn(4, 4), torch.randn(4, 4)]

    def key(threshold):
        flashcomm = _installed(fcpass_vllm.compilation_config({"threshold_tokens": threshold}))
        with inductor_config.patch({POST_GRAD_PASS_KEY: flashcomm, "fx_graph_cache": True}):
            return compiled_fx_graph_hash(gm, inputs, {}, [])[0]

    assert key(100) == key(100)
    assert key(100) != key(200)


class SequenceParallelismPass:
    """Stands in for vLLM's (whose constructor needs a live TP group): only its place in the order matters."""

    def __init__(self, config):
        pass

    def __call__(self, graph):
        pass

    def uuid(self):
        return "sequence-parallelism-stand-in"


def _manager_for(threshold, vllm_pass_config):
    """vLLM's PostGradPassManager as VllmBackend configures it for fcpass at ``threshold``."""
    import vllm.compilation.passes.pass_manager as pass_manager
    from vllm.config import ParallelConfig, VllmConfig

    config = fcpass_vllm.compilation_config({"threshold_tokens": threshold}, base={"pass_config": vllm_pass_config})
    vllm_config = VllmConfig(compilation_config=config, parallel_config=ParallelConfig(tensor_parallel_size=2))
    return configure_post_pass(vllm_config, pass_manager.PostGradPassManager(), POST_GRAD_PASS_KEY)


def test_vllm_pass_manager_runs_it_last_and_keys_its_cache_on_it():
    """vLLM's own backend code registers the pass: VllmBackend.configure_post_pass into PostGradPassManager."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    manager = _manager_for(16, {})
    assert type(manager.passes[-1]).__name__ == "VllmFlashCommPass"
    with pass_context(Range(1, 8)):  # vLLM's cache key (the manager's uuid) follows the threshold
        assert manager.uuid() == _manager_for(16, {}).uuid() != _manager_for(32, {}).uuid()


@needs_async_tp
def test_vllm_pass_manager_runs_it_after_sequence_parallelism_in_place_of_async_tp(monkeypatch):
    import vllm.compilation.passes.pass_manager as pass_manager

    # vLLM 0.31 imports SequenceParallelismPass into the manager on CUDA/XPU only; put one where the
    # manager looks, so its CUDA configuration runs here.
    monkeypatch.setattr(pass_manager, "SequenceParallelismPass", SequenceParallelismPass, raising=False)
    manager = _manager_for(16, {"fuse_gemm_comms": True, "sp_min_token_num": 1})
    names = [type(p).__name__ for p in manager.passes]
    assert "AsyncTPPass" not in names
    assert names.index("SequenceParallelismPass") < names.index("VllmFlashCommPass") == len(names) - 1


def plugin_probe(rank, world_size, cases):
    """vLLM loads its general plugins (fcpass's by its entry point), then builds a config per additional_config."""
    from vllm.config import VllmConfig
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    result = {}
    for name, additional in cases.items():
        try:
            config = VllmConfig(additional_config=additional).compilation_config.inductor_compile_config
            flashcomm = config.get("post_grad_custom_post_pass")
            result[name] = None if flashcomm is None else [type(flashcomm).__name__, flashcomm.config.to_dict()]
        except Exception as exc:
            result[name] = "error: " + str(exc)
    return result


PLUGIN_CASES = {"set": {"fcpass": {"threshold_tokens": 96, "fuse_all_gather_mm": False}},
                "not set": {}, "other keys only": {"ascend_compilation_config": {}},
                "bad value": {"fcpass": {"pipeline_chunks": 1000}}, "unknown field": {"fcpass": {"threshold": 5}}}
# The vLLM tests' ranks: fresh processes where vLLM finds the plugin by its entry point, as its workers do.
PLUGIN_PROBE = shared(plugin_probe, PLUGIN_CASES, setup=rank_setup, timeout=120)


def test_plugin_entry_point_installs_the_pass_from_additional_config():
    """The plugin as vLLM loads it (entry point, load_general_plugins), in fresh processes."""
    per_rank = PLUGIN_PROBE()
    assert per_rank[0] == per_rank[1]
    result = per_rank[0]
    name, config = result["set"]
    assert name == "VllmFlashCommPass"
    assert config == {**fcpass.PassConfig().to_dict(), "threshold_tokens": 96, "fuse_all_gather_mm": False}
    assert result["not set"] is None and result["other keys only"] is None
    assert result["bad value"].startswith("error:") and "pipeline_chunks" in result["bad value"]
    assert result["unknown field"].startswith("error:") and "'threshold'" in result["unknown field"]


@pytest.mark.parametrize("mode, ascend_compilation_config, runs", [
    ("FULL_DECODE_ONLY", None, False), ("FULL", {}, False), ("FULL_DECODE_ONLY", {"enable_npugraph_ex": True}, False),
    ("FULL_DECODE_ONLY", {"enable_npugraph_ex": False}, True), ("PIECEWISE", None, True),
    ("FULL_AND_PIECEWISE", None, True), ("NONE", None, True),
])
def test_vllm_ascend_graph_modes_that_run_no_user_pass_are_said_at_startup(monkeypatch, caplog, mode,
                                                                          ascend_compilation_config, runs):
    """vllm-ascend's npugraph_ex (on by default) compiles FULL / FULL_DECODE_ONLY without its pass manager."""
    from vllm.config import CUDAGraphMode, VllmConfig
    from vllm.platforms import current_platform

    from fcpass.vllm.compilation import ASCEND_PASS_KEY, check_installed_pass, passes_do_not_run

    monkeypatch.setattr(type(current_platform), "pass_key", property(lambda self: ASCEND_PASS_KEY))
    vllm_config = VllmConfig(compilation_config=fcpass_vllm.compilation_config({}))
    vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode[mode]  # as vllm-ascend's platform leaves it
    vllm_config.additional_config = ({} if ascend_compilation_config is None
                                     else {"ascend_compilation_config": ascend_compilation_config})
    with caplog.at_level("WARNING", logger="fcpass"):
        check_installed_pass(vllm_config)
    assert (passes_do_not_run(vllm_config) is None) == runs
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("fcpass")]
    assert bool(warnings) == (not runs)
    assert all(f"cudagraph_mode {mode}" in w and "enable_npugraph_ex'] to false" in w for w in warnings)


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_vllms_allreduce_rms_fusion_and_fcpass_sequence_parallelism_fail_at_startup_naming_both(sequence_parallel):
    """vLLM's fuse_allreduce_rms (on by default with TP > 1 on Hopper/Blackwell) rewrites the all_reduce + RMSNorm
    sites before user passes run; with fcpass's split asked for too, startup fails naming both settings. Checked
    where vLLM builds its config: the plugin's hook (vLLM loads general plugins before building its config)."""
    from vllm.config import VllmConfig

    from fcpass.vllm.compilation import check_installed_pass

    vllm_config = VllmConfig(compilation_config=fcpass_vllm.compilation_config({"sequence_parallel": sequence_parallel}))
    vllm_config.compilation_config.pass_config.fuse_allreduce_rms = True  # as vLLM resolves it on an H100
    if not sequence_parallel:
        check_installed_pass(vllm_config)  # the fusion families do not compete: nothing to say
        return
    with pytest.raises(ValueError, match="sequence_parallel.*fuse_allreduce_rms.*fuse_allreduce_rms=False"):
        check_installed_pass(vllm_config)


def test_every_stack_under_test_is_in_the_tested_ranges_and_the_plugin_says_when_one_is_not(monkeypatch, caplog):
    """fcpass.versions.TESTED is what make test runs: this stack is inside it; a version outside gets one plain
    WARNING at plugin load, naming the package, its version and the range."""
    import logging

    from fcpass import versions

    assert versions.untested(versions.installed()) == []
    monkeypatch.setattr(versions, "installed", lambda: {"torch": "2.15.0+cu130", "vllm": "0.35.0", "vllm-ascend": "0.30.0rc2"})
    with caplog.at_level(logging.WARNING, logger="fcpass"):
        versions.check()
    assert [r.getMessage() for r in caplog.records] == [
        f"fcpass: {package} {version} is outside the versions fcpass is tested with ({tested}); it may still work: "
        "check its report (README, 'Did it work?')"
        for package, version, tested in (("torch", "2.15.0+cu130", "2.10 to 2.14"), ("vllm", "0.35.0", "0.23 to 0.34"))]
    assert versions.major_minor("0.30.0rc2") == (0, 30) and versions.major_minor("2.13.0+cpu") == (2, 13)
