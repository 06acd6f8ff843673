"""vllm-ascend's own linear op family, built as vllm-ascend builds it, through its compile path with fcpass on.

Each op is vllm-ascend's: its ``AscendMergedColumnParallelLinear`` / ``AscendRowParallelLinear`` pick their op
(``vllm_ascend/ops/linear_op.py``'s ``get_parallel_op``) from the layer's prefix and vllm-ascend's config
switches, on its own parallel groups (``init_ascend_model_parallel``) after vLLM's; the model runs through
vllm-ascend's ``fusion_pass_compile`` with and without fcpass (the reference), in its forward context, on the
release built for the vLLM under test (0.23 and 0.30: ``make test-ascend023`` / ``test-ascend030``).

- ``mlp_tp``: ``finegrained_tp_config.mlp_tensor_parallel_size`` (vllm-ascend allows it for MoE models only,
  across DP ranks; 0.30 also only with TP=1, in graph mode, on a PD decode node, with its recompute scheduler:
  DP=2 of 2 ranks, DP=4 of 4 with mlp_tp=2, and on 0.23 DP=2 x TP=2 of 4): the MLP of a dense layer gathers
  its tokens over the ``mlptp`` group into ``gate_up_proj`` (``MLPColumnParallelOp``) and reduce-scatters
  ``down_proj``'s product back (``MLPRowParallelOp``).
- o_proj TP: ``finegrained_tp_config.oproj_tensor_parallel_size`` (TP=1 only, on a PD decode node): attention's
  output all_to_all'd over the ``otp`` group, its matmul reduce-scattered back (``OProjRowParallelOp``).
- FlashComm2 (0.23 only; 0.30 has none): ``enable_flashcomm2_parallel_size=2`` of TP=4, not on a decode node:
  attention's output all_to_all'd over the ``odp`` group into o_proj, reduce-scattered over ``otp``
  (``Flashcomm2OProjRowParallelOp``). Its graph never reaches fcpass: torch.compile cannot trace its
  ``dist.all_to_all_single`` into a 1-D receive buffer (torch remaps it to a functional all_to_all whose
  result, shaped like the 2-D send buffer, is copied into that buffer), with or without fcpass.

Each matmul beside a collective is fused, on the op's own group; at or below the threshold the same bits and
the same collective calls as without fcpass, above it the same numbers within float32's chunking bound. On
Atlas A2 the NPU backend leaves them alone (torch_npu: one communicator per model, vLLM's TP group's).

docs/REFERENCE.md's "vllm-ascend's linear ops" table lists each op, row for row with ``OUTCOMES``.
"""

import dataclasses

import pytest
import torch

from support import vllm_ascend_code as ascend
from support.multirank import shared

THRESHOLD = 16
TOKENS = (64, 8)  # above the threshold, below it
HIDDEN, FFN = 32, 64


def _layer(rank, layers: tuple[str, ...]):
    """Attention's output projection ("o_proj") and/or a dense MLP ("mlp"), of vllm-ascend's linear layers
    with the prefixes its model code gives them."""
    from vllm_ascend.ops.linear import AscendMergedColumnParallelLinear, AscendRowParallelLinear

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if "o_proj" in layers:
                self.o_proj = AscendRowParallelLinear(HIDDEN * 2, HIDDEN, bias=False,
                                                      prefix="model.layers.0.self_attn.o_proj")
            if "mlp" in layers:
                self.gate_up_proj = AscendMergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False,
                                                                     prefix="model.layers.0.mlp.gate_up_proj")
                self.down_proj = AscendRowParallelLinear(FFN, HIDDEN, bias=False,
                                                         prefix="model.layers.0.mlp.down_proj")
            g = torch.Generator().manual_seed(rank)
            for p in self.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

        def forward(self, x):
            if "o_proj" in layers:
                x = _output(self.o_proj(x))
            if "mlp" in layers:
                gate, up = _output(self.gate_up_proj(x)).chunk(2, -1)
                x = _output(self.down_proj(torch.relu(gate) * up))
            return x

    return Layer()


def _output(result):
    return result[0] if isinstance(result, tuple) else result


@dataclasses.dataclass(frozen=True)
class Layout:
    """vllm-ascend's switches for one deployment of its linear ops, and the layers built."""

    ranks: int
    data_parallel_size: int
    switches: dict  # vllm-ascend's additional_config keys
    layers: tuple[str, ...]
    ops: dict  # layer name -> the op vllm-ascend picks for it
    decode_node: bool = True  # a PD decode node (kv_consumer): fine-grained TP needs one, FlashComm2 refuses one

    @property
    def input_width(self) -> int:
        return HIDDEN * 2 if "o_proj" in self.layers else HIDDEN  # attention's output, or the MLP's input


def _fine_grained(ranks: int, dp: int, size: int) -> Layout:
    """mlp_tp of ``size`` (and o_proj TP where TP=1, which vllm-ascend requires for it); vllm-ascend 0.30
    requires its recompute scheduler with fine-grained TP (it keeps decode steps decode-shaped)."""
    oproj = ranks == dp
    sizes = {"mlp_tensor_parallel_size": size, **({"oproj_tensor_parallel_size": size} if oproj else {})}
    return Layout(ranks, dp, {"finegrained_tp_config": sizes, "recompute_scheduler_enable": True},
                  ("o_proj", "mlp") if oproj else ("mlp",),
                  {**({"o_proj": "OProjRowParallelOp"} if oproj else {}),
                   "gate_up_proj": "MLPColumnParallelOp", "down_proj": "MLPRowParallelOp"})


# vllm-ascend 0.30 allows fine-grained TP with TP=1 only
LAYOUTS = {"DP=2, mlp_tp=2": _fine_grained(2, 2, 2), "DP=4, mlp_tp=2": _fine_grained(4, 4, 2)}
if ascend.TP_FLASHCOMM:
    LAYOUTS["DP=2 x TP=2, mlp_tp=2"] = _fine_grained(4, 2, 2)
    # FlashComm2 of TP=4 with o_proj TP 2: otp groups [0, 2] / [1, 3], odp [0, 1] / [2, 3]
    LAYOUTS["TP=4, FlashComm2 otp=2"] = Layout(4, 1, {"enable_flashcomm2_parallel_size": 2}, ("o_proj",),
                                               {"o_proj": "Flashcomm2OProjRowParallelOp"}, decode_node=False)
# layouts whose graph torch.compile cannot trace (the reason: the module docstring)
UNTRACEABLE = {"TP=4, FlashComm2 otp=2"}


def _decode_node():
    """vllm-ascend takes o_proj TP (0.23) and any fine-grained TP (0.30) on a prefill/decode-disaggregated
    decode node only: its kv_transfer_config a KV consumer (the connector is never started here)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_consumer")


def _own_groups(groups, layout: Layout) -> dict:
    """vllm-ascend's groups the layout's ops talk on, by name: their ranks and torch groups."""
    if "enable_flashcomm2_parallel_size" in layout.switches:
        getters = {"otp": "get_flashcomm2_otp_group", "odp": "get_flashcomm2_odp_group"}
    else:
        getters = {"mlp_tp": "get_mlp_tp_group"}
    if "oproj_tensor_parallel_size" in layout.switches.get("finegrained_tp_config", {}):
        getters["otp"] = "get_otp_group"
    return {name: getattr(groups, getter)() for name, getter in getters.items()}


def run_linear_ops(rank, world_size, name):
    import fcpass
    import fcpass.vllm as fcpass_vllm
    from devtools.vllm_cpu import vllm_tp
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.utils import Range
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fcpass.backends.base import FusedCall
    from fcpass.backends.npu import NpuBackend
    from fcpass.matmuls import Matmul
    from fcpass.vllm.compilation import ASCEND_PASS_KEY
    from support.collective_calls import collective_events, profiled
    from support.vllm_backend import configure_post_pass

    layout = LAYOUTS[name]
    config = fcpass_vllm.compilation_config({"threshold_tokens": THRESHOLD})
    results = {}
    # fine-grained TP: MoE models only (vllm-ascend's rule), on a decode node
    with vllm_tp(rank, world_size, config, ascend.additional_config(**layout.switches),
                 ascend.model_config("qwen3_moe"), data_parallel_size=layout.data_parallel_size,
                 kv_transfer_config=_decode_node() if layout.decode_node else None) as (vllm_config, tp), \
            torch.no_grad():
        if not ascend.TP_FLASHCOMM:
            # vllm-ascend 0.30 takes fine-grained TP in graph mode only, its graphs covering every decode step
            # (else it turns it off); vLLM's CPU platform turned graphs off (NPUs keep them): set as an NPU has them
            compilation = vllm_config.compilation_config
            compilation.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
            compilation.max_cudagraph_capture_size = vllm_config.scheduler_config.max_num_seqs
        ascend.init_config(vllm_config)
        ascend.load_ops()
        with ascend.parallel_groups(vllm_config) as groups:
            own = _own_groups(groups, layout)
            model = _layer(rank, layout.layers)
            results["ops"] = {name: type(layer.custom_op).__name__ for name, layer in model.named_children()}
            results["groups"] = {"tp": tp.ranks, **{name: group.ranks for name, group in own.items()}}
            manager = configure_post_pass(vllm_config, GraphFusionPassManager(), ASCEND_PASS_KEY)
            compile_range = Range(start=1, end=8192)
            got_fn = ascend.compiled(model, manager, compile_range)
            want_fn = ascend.compiled(model, GraphFusionPassManager(), compile_range)
            if name in UNTRACEABLE:
                return {**results, "compile": _compile_errors(vllm_config, compile_range, want_fn, got_fn, manager)}
            for tokens in TOKENS:
                x = torch.randn(tokens, layout.input_width, generator=torch.Generator().manual_seed(tokens))
                counted = {}
                with pass_context(compile_range), ascend.forward(vllm_config, tokens):
                    for label, fn in (("want", want_fn), ("got", got_fn)):
                        fn(x)  # compiles on a first call
                        fcpass.reset_decision_counts()
                        with profiled() as prof:
                            counted[label] = (fn(x), collective_events(prof))
                want, got = counted["want"][0], counted["got"][0]
                results[tokens] = {"same_bits": torch.equal(got, want), "calls": {k: v[1] for k, v in counted.items()},
                                   "error": ((got - want).abs().max() / want.abs().max()).item(),
                                   "decisions": sorted(fcpass.decision_counts())}
            results["report"] = sorted(map(tuple, manager.passes[-1].last_report.rows()))
            x, mm = torch.randn(8, HIDDEN), Matmul(torch.randn(HIDDEN, FFN), None)
            results["on A2"] = {(name, op): NpuBackend().unsupported(op, FusedCall(
                x=x, matmuls=(mm,), group=group.device_group, group_name=group.device_group.group_name,
                world_size=group.world_size, row_scale=None, pad_rows=0))
                for name, group in own.items() for op in ("mm_reduce_scatter", "all_gather_mm")}
    return results


def _compile_errors(vllm_config, compile_range, want_fn, got_fn, manager) -> dict:
    """What compiling says, without fcpass and with it, and what fcpass's pass reported."""
    from vllm.compilation.passes.inductor_pass import pass_context

    x = torch.randn(TOKENS[0], HIDDEN * 2)
    errors = {}
    for label, fn in (("want", want_fn), ("got", got_fn)):
        with pass_context(compile_range), ascend.forward(vllm_config, TOKENS[0]):
            try:
                fn(x)
                errors[label] = None
            except Exception as exc:  # noqa: BLE001  (what torch.compile raises is the finding)
                errors[label] = f"{type(exc).__name__}: {exc}"
    return {"errors": errors, "fcpass's report": manager.passes[-1].last_report.rows()}


RUNS = {name: shared(run_linear_ops, name, world_size=layout.ranks, setup=ascend.compile_setup, timeout=420)
        for name, layout in LAYOUTS.items()}

# op -> (what its graph holds, what fcpass does): docs/REFERENCE.md's table, row for row
OUTCOMES = {
    "OProjRowParallelOp": ("all_to_all_single on the otp group -> vllm.unquantized_gemm -> vllm.reduce_scatter on "
                           "the otp group", ("mm_reduce_scatter", "vllm/unquantized_gemm", "fused")),
    "MLPColumnParallelOp": ("vllm.all_gather on the mlptp group -> vllm.unquantized_gemm",
                            ("all_gather_mm", "vllm/unquantized_gemm", "fused")),
    "MLPRowParallelOp": ("vllm.unquantized_gemm -> vllm.reduce_scatter on the mlptp group",
                         ("mm_reduce_scatter", "vllm/unquantized_gemm", "fused")),
    # its source's, as torch.compile never traces it (test_flashcomm2s_o_proj_never_reaches_fcpass)
    "Flashcomm2OProjRowParallelOp": ("all_to_all_single on the odp group -> o_proj's matmul -> reduce_scatter on "
                                     "the otp group", None),
}
NEVER_COMPILED = "never reaches fcpass"


@pytest.mark.parametrize("name", [name for name in LAYOUTS if name not in UNTRACEABLE])
def test_its_ops_fuse_on_their_own_groups_and_give_the_same_numbers(name):
    per_rank = RUNS[name]()
    layout = LAYOUTS[name]
    for rank, r in enumerate(per_rank):
        assert r["ops"] == layout.ops
        assert len(r["groups"]["tp"]) == layout.ranks // layout.data_parallel_size
        assert r["report"] == sorted(OUTCOMES[op][1] for op in layout.ops.values())
        for tokens in TOKENS:
            run = r[tokens]
            path = "fused" if tokens > THRESHOLD else "unfused"
            assert {decision[:2] for decision in run["decisions"]} == {
                (OUTCOMES[op][1][0], path) for op in layout.ops.values()}, (tokens, run["decisions"])
            if tokens <= THRESHOLD:  # the ops' own collectives and matmuls
                assert run["same_bits"] and run["calls"]["got"] == run["calls"]["want"], (tokens, run)
            else:
                assert run["error"] <= (FFN + 2) * torch.finfo(torch.float32).eps, (tokens, run["error"])
        for where, reason in r["on A2"].items():
            assert "Atlas A2 fuses on one communicator" in reason, (where, reason)
    for tokens in TOKENS:
        assert len({str(r[tokens]["decisions"]) for r in per_rank}) == 1  # the same protocol on every rank


def test_the_readmes_table_is_these_outcomes():
    """docs/REFERENCE.md "vllm-ascend's linear ops": one row per op here, with its graph and what fcpass does."""
    from support import docs

    rows = [line.split(" | ") for line in docs.section("vllm-ascend's linear ops", docs.REFERENCE).splitlines()
            if line.startswith("| `")]
    table = {row[0].strip("| `").split("`")[0]: (row[1], row[2].rstrip(" |")) for row in rows}
    assert table.keys() == OUTCOMES.keys()
    for op, (graph, row) in OUTCOMES.items():
        said = f"{row[2]}: `{row[0]}`" if row else NEVER_COMPILED
        assert table[op][0] == graph and table[op][1].startswith(said), (op, table[op])


def test_flashcomm2s_o_proj_never_reaches_fcpass():
    """0.23: vllm-ascend's FlashComm2 o_proj, on its own groups, fails in torch.compile's trace of its all_to_all,
    without fcpass as with it, before any pass runs. 0.30: vllm-ascend has no FlashComm2 op."""
    if not ascend.TP_FLASHCOMM:
        assert "class Flashcomm2OProjRowParallelOp" not in (ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        return
    (name,) = UNTRACEABLE
    for rank, r in enumerate(RUNS[name]()):
        assert r["ops"] == LAYOUTS[name].ops
        assert r["groups"]["otp"] == [rank % 2, rank % 2 + 2] and r["groups"]["odp"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        errors = r["compile"]["errors"]
        for label in ("want", "got"):
            # Dynamo's trace fails at the all_to_all's copy into the 1-D buffer: no backend, no pass runs
            assert errors[label].startswith("TorchRuntimeError: Dynamo failed to run FX node") and (
                "copy_" in errors[label] and "all_to_all" in errors[label]), (label, errors[label])
        assert r["compile"]["fcpass's report"] == []
