"""fcpass inside vllm-ascend's real compile path (0.23 on vLLM 0.23, 0.30 on vLLM 0.30), 2 gloo ranks, vLLM's TP group.

vllm-ascend's own code, unpacked from its sdist (devtools/sources.py; `make test` fetches it): vLLM's
``VllmBackend.configure_post_pass`` fills its ``GraphFusionPassManager`` (pass key ``graph_fusion_manager``),
and its ``fusion_pass_compile`` calls that manager as aot_autograd's compiler, handing every pass an
``fx.GraphModule`` and running the result eagerly (no Inductor after it), as vllm-ascend compiles a model
(docs/ASCEND.md). torch_npu is the test stand-in (tests/standins/npu, its kernels on CPU tensors).
vllm-ascend's own fusion passes are switched off (their patterns need torchair and NPU kernels), so fcpass
is the manager's only pass.

Two kinds of graph: vLLM's own collectives (``linear`` with a rank-0-only bias, ``vllm.all_reduce`` /
``reduce_scatter`` / ``all_gather``), and vllm-ascend's: its registered ops (``vllm.unquantized_gemm``,
``vllm.quantize``, the FlashComm v1 collectives ``maybe_pad_and_reduce`` /
``maybe_all_gather_and_maybe_unpad``; tests/support/vllm_ascend_code.py) with ``npu.npu_quant_matmul``,
run in vllm-ascend's own forward context, which switches FlashComm per forward.
"""

import json

import pytest
import torch

from fcpass.matmuls import SCALAR_TYPE_NUMBERS
from support import replays, vllm_ascend_code as ascend
from support.multirank import shared

THRESHOLD = 16
TOKENS = (8, 64, 63)  # at or below the threshold, above it, and a count world_size does not divide
# vllm-ascend's forwards (tokens, DP padded length). 0.23: FlashComm off (<= 1000 tokens, below and above the
# threshold), on with TP padding, on with DP padding. 0.30: its EP collectives (token counts the world size
# divides: they pad only under DP)
ASCEND_RUNS = (((7, None), (700, None), (1001, None), (2048, None), (2047, 2052)) if ascend.TP_FLASHCOMM
               else ((8, None), (700, None), (2048, None)))
HIDDEN, FFN = 32, 48
BF16_SCALAR_TYPE = SCALAR_TYPE_NUMBERS[torch.bfloat16]  # torch-npu's output_dtype: a c10 ScalarType number


class RowThenColumn(torch.nn.Module):
    """Row-parallel linear (bias on rank 0 only, as vLLM's RowParallelLinear) -> all_reduce -> relu; or the
    sequence-parallel form: row-parallel -> reduce_scatter -> relu -> all_gather -> column-parallel linear, with
    vLLM's collectives or vllm-ascend's FlashComm ones (and its gemm op, or its W8A8 linear's ops)."""

    def __init__(self, rank, form):
        super().__init__()
        g = torch.Generator().manual_seed(rank)
        self.form = form
        self.w_row = torch.nn.Parameter(torch.randn(HIDDEN, FFN, generator=g) / FFN ** 0.5)
        self.b_row = torch.nn.Parameter(torch.randn(HIDDEN, generator=g)) if rank == 0 else None
        self.w_col = torch.nn.Parameter(torch.randn(FFN, HIDDEN, generator=g) / HIDDEN ** 0.5)
        # W8A8 as vllm-ascend's linear holds it: int8 weights stored (k, n), float32 dequant scales, int32 biases
        self.q_row = torch.randint(-127, 128, (FFN, HIDDEN), generator=g, dtype=torch.int8)
        self.q_col = torch.randint(-127, 128, (HIDDEN, FFN), generator=g, dtype=torch.int8)
        self.deq_row, self.deq_col = torch.rand(HIDDEN, generator=g) * 2e-5, torch.rand(FFN, generator=g) * 1e-3
        self.qb_row = torch.randint(-1000, 1000, (HIDDEN,), generator=g, dtype=torch.int32) if rank == 0 else None
        # vllm-ascend quantizes x * (1 / input_scale): int8 steps of 1/40 for rows of unit scale
        self.in_scale, self.in_offset = torch.tensor([1 / 40]), torch.tensor([0.0])

    def forward(self, x):
        from vllm.distributed import (tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce,
                                      tensor_model_parallel_reduce_scatter)

        vllm = torch.ops.vllm
        if self.form == "flashcomm_w8a8":
            shard = torch.relu(ascend.pad_and_reduce(self._w8a8(x, self.q_row, self.deq_row, self.qb_row)))
            return self._w8a8(ascend.all_gather_and_unpad(shard), self.q_col, self.deq_col, None)
        if self.form == "flashcomm":
            shard = torch.relu(ascend.pad_and_reduce(vllm.unquantized_gemm(x, self.w_row, self.b_row)))
            return vllm.unquantized_gemm(ascend.all_gather_and_unpad(shard), self.w_col, None)
        y = torch.nn.functional.linear(x, self.w_row, self.b_row)
        if self.form == "all_reduce":
            return torch.relu(tensor_model_parallel_all_reduce(y))
        shard = torch.relu(tensor_model_parallel_reduce_scatter(y, 0))
        return torch.nn.functional.linear(tensor_model_parallel_all_gather(shard, 0), self.w_col)

    def bound(self, want: torch.Tensor) -> float:
        """The fused path's error bound relative to max |want|, from the math. Float forms: its chunked matmuls
        and its collective sum in another order, k = FFN products and 2 ranks of float32 rounding. W8A8: its sum
        may round the bf16 row-parallel output one ulp away from vLLM's communicator's (vLLM's CPU shm kernel
        on the AVX-512 build without bf16 rounds differently from gloo), which can move each quantized input
        of the column-parallel linear by one int8 step: at most deq_scale[n] * sum_k |w[k, n]| per output,
        plus the output's own bf16 rounding."""
        peak = want.float().abs().max().item()
        if self.form != "flashcomm_w8a8":
            return (FFN + 2) * torch.finfo(torch.float32).eps
        steps = (self.deq_col * self.q_col.float().abs().sum(0)).max().item()
        return steps / peak + torch.finfo(torch.bfloat16).eps

    def _w8a8(self, x, w, deq_scale, bias):
        """vllm-ascend's static W8A8 linear: its quantize op, then npu_quant_matmul."""
        q = torch.ops.vllm.quantize(x, self.in_scale, 1 / self.in_scale, self.in_offset)
        return torch.ops.npu.npu_quant_matmul(q, w, deq_scale, bias=bias, output_dtype=BF16_SCALAR_TYPE)


def run_in_vllm_ascend_compile(rank, world_size):
    import contextlib
    import os
    import tempfile

    import fcpass
    import fcpass.vllm as fcpass_vllm
    from devtools.vllm_cpu import vllm_tp
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fcpass.vllm.compilation import ASCEND_PASS_KEY
    from passes.capture import CAPTURE_ENV
    from support.collective_calls import collective_events, counting, profiled
    from support.vllm_backend import configure_post_pass

    from vllm.platforms import current_platform

    # vLLM's kernels before its groups, as its workers load them: the communicator under every vLLM collective
    # is then the one users get (the shm one on AVX-512 builds), whatever else ran in this process first
    current_platform.import_kernels()
    config = fcpass_vllm.compilation_config({"threshold_tokens": THRESHOLD})
    results = {}
    # 0.30's padding collectives exist in MoE models only (they need vLLM's EP group)
    model = ascend.model_config("llama" if ascend.TP_FLASHCOMM else "qwen3_moe")
    with vllm_tp(rank, world_size, config, ascend.additional_config(), model) as (vllm_config, tp), \
            torch.no_grad():
        ascend.init_config(vllm_config)
        ascend.load_ops()
        manager = configure_post_pass(vllm_config, GraphFusionPassManager(), ASCEND_PASS_KEY)
        results["passes"] = [type(p).__name__ for p in manager.passes]
        results["tp_name"] = tp.unique_name  # "tp:N", N the TP groups this process made before (shared ranks)
        compile_range = Range(start=1, end=8192)

        calls = counting(tp)
        # every graph the pass gets is captured (FCPASS_CAPTURE, read when the pass runs), for the replay test
        results["captures"] = os.environ[CAPTURE_ENV] = tempfile.mkdtemp(prefix=f"fcpass-ascend-r{rank}-")
        for form in ("all_reduce", "sequence_parallel", "flashcomm", "flashcomm_w8a8"):
            torch._dynamo.reset()
            model = RowThenColumn(rank, form)
            compiled = ascend.compiled(model, manager, compile_range)
            # the reference: the same model through vllm-ascend's compile path without fcpass
            reference = ascend.compiled(model, GraphFusionPassManager(), compile_range)
            on_ascend = form.startswith("flashcomm")
            runs = {}
            for tokens, dp_padded_length in (ASCEND_RUNS[::-1] if on_ascend else [(n, None) for n in TOKENS]):
                if form == "sequence_parallel" and tokens % world_size:
                    continue  # the model itself scatters without padding
                x = torch.randn(tokens, FFN, generator=torch.Generator().manual_seed(tokens))
                forward = (ascend.forward(vllm_config, tokens, dp_padded_length) if on_ascend
                           else contextlib.nullcontext())
                counted = {}
                with pass_context(compile_range), forward:
                    for label, fn in (("want", reference), ("got", compiled)):
                        fn(x)  # compiles on a first call
                        fcpass.reset_decision_counts()
                        calls.clear()
                        with profiled() as prof:
                            out = fn(x)
                        counted[label] = (out, collective_events(prof), dict(calls))
                want, got = counted["want"][0], counted["got"][0]
                assert want.float().abs().max() > 0, (form, tokens)
                runs[tokens, dp_padded_length] = {
                    "error": ((got.float() - want.float()).abs().max() / want.float().abs().max()).item(),
                    "bound": model.bound(want), "same_bits": torch.equal(got, want),
                    "calls": {label: counted[label][1:] for label in counted},
                    "decisions": sorted(fcpass.decision_counts())}
            results[form] = {"runs": runs, "matched": manager.passes[-1].matched}
        del os.environ[CAPTURE_ENV]
    return results


ASCEND_COMPILE = shared(run_in_vllm_ascend_compile, setup=ascend.compile_setup, timeout=360)


def test_vllm_registers_the_pass_in_vllm_ascends_real_manager():
    for r in ASCEND_COMPILE():
        assert r["passes"] == ["VllmFlashCommPass"]  # vllm-ascend's own passes off (they need torchair)


@pytest.mark.parametrize("form, matched", [
    # vLLM's linear traces to addmm on rank 0 (its bias) and mm elsewhere
    ("all_reduce", {"mm_all_reduce": 1}),
    ("sequence_parallel", {"mm_reduce_scatter": 1, "all_gather_mm": 1}),
    ("flashcomm", {"mm_reduce_scatter": {"vllm_ascend/unquantized_gemm": 1},
                   "all_gather_mm": {"vllm_ascend/unquantized_gemm": 1}}),
    ("flashcomm_w8a8", {"mm_reduce_scatter": {"vllm_ascend/npu_quant_matmul": 1},
                        "all_gather_mm": {"vllm_ascend/npu_quant_matmul+quantize": 1}}),
])
def test_fusion_pass_compile_runs_fcpass_on_its_graph_module_and_the_numbers_hold(form, matched):
    """It used to raise AttributeError: the manager hands the pass a GraphModule, not a Graph. vllm-ascend's
    forms: on 0.23 FlashComm off in a forward (<= 1000 tokens: all_reduce, no gather), on with TP and DP
    padding; on 0.30 its EP collectives, left alone (the same bits at every size). The reference is the model
    through vllm-ascend's compile path without fcpass: at or below the threshold the same bits and the same
    collective calls (vllm-ascend's ops, vLLM's communicator under them), above it within the bound the math
    gives (RowThenColumn.bound)."""
    per_rank = ASCEND_COMPILE()
    if form.startswith("flashcomm") and not ascend.TP_FLASHCOMM:
        for r in per_rank:
            assert r[form]["matched"] == {}
            for run in r[form]["runs"].values():
                assert run["decisions"] == [] and run["same_bits"], (form, run)
                assert run["calls"]["got"] == run["calls"]["want"], (form, run)
        return
    for rank, r in enumerate(per_rank):
        result = r[form]
        sites = {family: sum(forms.values()) for family, forms in result["matched"].items()}
        assert (result["matched"] if isinstance(next(iter(matched.values())), dict) else sites) == matched, sites
        for (tokens, _), run in result["runs"].items():
            paths = {path for _, path, _ in run["decisions"]}
            assert paths == {"fused" if tokens > THRESHOLD else "unfused"}, (form, tokens, run["decisions"])
            if tokens <= THRESHOLD:  # the site's own ops: the same collective calls, the same bits
                assert run["same_bits"] and run["calls"]["got"] == run["calls"]["want"], (form, tokens, run)
            else:
                assert run["error"] <= run["bound"], (form, tokens, run["error"], run["bound"])
    for run in per_rank[0][form]["runs"]:
        assert per_rank[0][form]["runs"][run]["decisions"] == per_rank[1][form]["runs"][run]["decisions"]


def test_its_captures_replay_where_vllm_ascend_and_torch_npu_are_not_installed(tmp_path):
    """The graphs vllm-ascend's compile path handed the pass (FCPASS_CAPTURE in the ranks), FlashComm and W8A8
    forms included, replayed in a process where vLLM, vllm-ascend and torch_npu cannot be imported (their ops
    registered from the captured schemas): per rank the live report row for row, well-formed rewritten graphs,
    ranks agreeing, and vllm-ascend's sites fused (0.23's FlashComm ones; 0.30's EP ones left alone)."""
    (tp_name,) = {r["tp_name"] for r in ASCEND_COMPILE()}
    captures = replays.gather([r["captures"] for r in ASCEND_COMPILE()], tmp_path / "captures")
    live = replays.live_reports(captures)
    done, results = replays.replay(captures)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(results["graphs"]) == len(live) >= 8  # four forms on two ranks
    fused = set()
    for graph in results["graphs"]:
        assert graph["problems"] == [] and graph["report"] == live[graph["capture"]], graph
        fused |= {op for op in graph["ops_after"] if op.startswith("fcpass.")}
    scaled = {"fcpass.mm_reduce_scatter_scaled.default", "fcpass.all_gather_scaled_mm.default"}  # FlashComm W8A8
    assert {"fcpass.mm_reduce_scatter.default", "fcpass.all_gather_mm.default"} <= fused
    assert scaled <= fused if ascend.TP_FLASHCOMM else not scaled & fused  # 0.30: its EP collectives, left alone
    facts = [json.loads(path.read_text()) for path in captures.rglob("capture.json")]
    schemas = {name for f in facts for name in f["schemas"]}
    for f in facts:  # each group the pass read: its size and its global ranks; vLLM's TP group by name
        process = f["process"]
        assert process["tp_group"] == [tp_name, 2] and f["world_size"] == 2 and f["rank"] in (0, 1)
        tp_sites = ascend.TP_FLASHCOMM or any(op.startswith(("vllm.all_", "vllm.reduce_scatter"))
                                              for op in f["ops_before"])  # 0.30's EP collectives name no group
        assert bool(process["groups"]) == tp_sites  # every collective's group is asked up front
        assert {name: len(ranks) for name, ranks in process["group_ranks"].items()} == {
            name: size for name, size in process["groups"].items() if size is not None}
    assert {"npu.npu_quant_matmul.default", "vllm.maybe_pad_and_reduce.default"} <= schemas
    replays.keep_if_asked(captures, "vllm_ascend_tp2")


def run_the_readmes_ascend_command(rank, world_size):
    """The README quickstart's Ascend ``vllm serve`` command, through vLLM's serve parser, into vLLM's config with
    fcpass's plugin registered, then vllm-ascend's own config of it (its platform reads the same
    ``additional_config``)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm_ascend.ascend_config import get_ascend_config

    import fcpass
    from fcpass.vllm import plugin
    from fcpass.vllm.compilation import ASCEND_PASS_KEY, passes_do_not_run
    from integration.test_readme import SERVE_COMMANDS, engine_args, serve_arguments

    (command,) = [c for c in SERVE_COMMANDS if "ascend_compilation_config" in c]
    args = engine_args(serve_arguments(command))
    plugin.register()
    vllm_config = VllmConfig(compilation_config=args.compilation_config, additional_config=args.additional_config,
                             model_config=ascend.model_config("llama"))  # MODEL: vllm-ascend 0.23 reads its config
    with set_current_vllm_config(vllm_config):  # as vllm-ascend's platform has it when it reads the config
        ascend.init_config(vllm_config)
    installed = vllm_config.compilation_config.inductor_compile_config[ASCEND_PASS_KEY]
    return {"fcpass": installed.config == fcpass.PassConfig.from_dict(args.additional_config["fcpass"]),
            "npugraph_ex": get_ascend_config().ascend_compilation_config.enable_npugraph_ex,
            "passes run": passes_do_not_run(vllm_config) is None}


README_COMMAND = shared(run_the_readmes_ascend_command, world_size=1, setup=ascend.compile_setup, timeout=120)


def test_the_readmes_ascend_command_is_one_vllm_ascend_takes_and_fcpass_runs_under():
    assert README_COMMAND() == [{"fcpass": True, "npugraph_ex": False, "passes run": True}]
