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
  (``Flashcomm2OProjRowParallelOp``), then gathered over vLLM's TP group where FlashComm v1 is off (a dense
  model's layer at ``TOKENS``; a MoE model has it on in every forward), in a 1002-token prefill left the rank's
  token shard. torch 2.10's trace of its ``dist.all_to_all_single`` into a 1-D receive buffer fails (torch copies
  a result shaped like the 2-D send buffer into it); fcpass's pass makes it traceable (``fcpass.traceable``),
  and the reference (vllm-ascend's compile path without fcpass's pass) is that trace too, checked equal to the
  op run uncompiled, as every layout's is.
- DeepSeek V4's attention output (``wo_a``, ``wo_b``) under o_proj TP: vllm-ascend's DSV4 ops, a matmul each on
  the otp group's shards with no collective in the op (its model code communicates): nothing for fcpass.
- DSA CP (``enable_dsa_cp``, on a model whose config has DeepSeek V3.2's ``index_topk``, vllm-ascend's test for an
  indexer; 0.23 with FlashComm v1, 0.30 where vLLM's ``use_sequence_parallel_moe`` holds: expert parallelism,
  TP > 1, and DP > 1 unless vllm-ascend's platform patch drops that, so DP=2 x TP=2 here): ``q_b_proj``'s
  ``ShardedCPColumnParallelOp``, a "fake comm group" of one, no collective: nothing for fcpass; with it a
  replicated layer (MLA's ``kv_a_proj_with_mqa``: ``CustomReplicatedOp``), one matmul, nothing either. 0.23's
  ``ShardedCPRowParallelOp`` (its o_proj on a PD prefill node, the same fake group, no collective) never reaches
  fcpass: Dynamo stops at the ``SimpleNamespace`` its ``tp_rank`` builds per call, with or without fcpass; in
  vllm-ascend's model it runs inside DSA's attention op, which vLLM's graph keeps opaque.
- FlashComm2's o_shard (0.23 only; the same with ``layer_sharding: ["o_proj"]``, on a PD prefill node as its
  platform requires; 3 layers, as its prefetch step of 1 requires): each layer's o_proj, as it is built, is
  registered with the o_shard manager (its weight kept by one rank of the ``shard_weight`` group) and qkv_proj
  (``Flashcomm2OshardQKVParallelOp``) gathers its token shard, starts the async broadcast of the next layer's
  o_proj weight, then its matmul. The o_projs are built, never run (their weights are there only once qkv_proj
  has broadcast them), so qkv_proj is judged alone; its graph never reaches fcpass: Dynamo cannot trace that
  broadcast (the ``set_`` of the weight onto its prefetch window; ``dist.broadcast``'s pybind options), with or
  without fcpass.
- FlashComm v1 (0.23 only; ``enable_flashcomm1``, on in every layout here): a dense model's MLP on vLLM's TP
  group (TP=2), its gate_up_proj's input gathered (``SequenceColumnParallelOp``, vllm-ascend's
  ``maybe_all_gather_and_maybe_unpad``), its down_proj one opaque ``matmul_and_reduce``
  (``SequenceRowParallelOp``). vllm-ascend turns it on per forward, above 1000 tokens: at ``TOKENS`` the gather
  returns its input and fcpass has nothing to fuse; compiled in a forward with it on, fcpass fuses the gather,
  and ``matmul_and_reduce`` fails on the gloo ranks: it asks the TP group's "npu" backend for an HCCL comm name
  (for its own ``npu_mm_reduce_scatter_base``), and torch has no "npu" device here. The stand-in's
  ``install()`` would make one, but torch 2.10's ``barrier`` (vLLM's group setup) then asks torch_npu's
  PrivateUse1 hooks, which it has not.
- matmul_allreduce (0.23 only; ``enable_matmul_allreduce``): every row-parallel layer no other op takes
  (``MatmulAllreduceRowParallelOp``, torch_npu's ``npu_mm_all_reduce_base``) asks for the same comm name as it is
  built: never built here.

Each matmul beside a collective is fused, on the op's own group; at or below the threshold the same bits and
the same collective calls as without fcpass, above it the same numbers within float32's chunking bound. On
Atlas A2 the NPU backend leaves those on vllm-ascend's own groups alone (torch_npu: one communicator per model,
vLLM's TP group's) and takes FlashComm v1's, on vLLM's TP group.

docs/REFERENCE.md's "vllm-ascend's linear ops" table lists each op, row for row with ``OUTCOMES``.
"""

import contextlib
import dataclasses
import traceback

import pytest
import torch

from passes import report
from support import vllm_ascend_code as ascend
from support.engine_expectations import sorted_rows
from support.multirank import shared

THRESHOLD = 16
TOKENS = (64, 8)  # above the threshold, below it
HIDDEN, FFN = 32, 64
HEADS, HEAD = 4, 8  # qkv_proj's attention heads (and as many KV heads), of HEAD each: one of each per rank of TP=4


def _layer(rank, layers: tuple[str, ...], hidden_layers: int = 0, w8a8: bool = False):
    """Attention's output projection ("o_proj"; DeepSeek V4's, "wo_a" then "wo_b": "dsv4") and/or a dense MLP
    ("mlp", or its first linear alone: "gate_up_proj"), or attention's input projection ("qkv_proj"), of
    vllm-ascend's linear layers with the prefixes its model code gives them. ``hidden_layers``: every layer's
    o_proj built too (never run), as its model builds them, which registers them with FlashComm2's o_shard
    (vllm-ascend then broadcasts them).
    ``w8a8``: o_proj quantized as a W8A8 (static) checkpoint gives it to vllm-ascend (:func:`_load_w8a8`)."""
    from vllm_ascend.ops.linear import (AscendColumnParallelLinear, AscendMergedColumnParallelLinear,
                                        AscendQKVParallelLinear, AscendReplicatedLinear, AscendRowParallelLinear)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if "o_proj" in layers:
                self.o_proj = AscendRowParallelLinear(HIDDEN * 2, HIDDEN, bias=False,
                                                      prefix="model.layers.0.self_attn.o_proj",
                                                      **(_w8a8_args("model.layers.0.self_attn.o_proj") if w8a8 else {}))
            if "dsv4" in layers:
                self.wo_a = AscendColumnParallelLinear(HIDDEN, HIDDEN * 2, bias=False,
                                                       prefix="model.layers.0.self_attn.wo_a")
                self.wo_b = AscendRowParallelLinear(HIDDEN * 2, HIDDEN, bias=False,
                                                    prefix="model.layers.0.self_attn.wo_b")
            if "mlp" in layers or "gate_up_proj" in layers:
                self.gate_up_proj = AscendMergedColumnParallelLinear(HIDDEN, [FFN, FFN], bias=False,
                                                                     prefix="model.layers.0.mlp.gate_up_proj")
            if "mlp" in layers:
                self.down_proj = AscendRowParallelLinear(FFN, HIDDEN, bias=False,
                                                         prefix="model.layers.0.mlp.down_proj")
            if "q_b_proj" in layers:  # DeepSeek V3.2's query up-projection (MLA)
                self.q_b_proj = AscendColumnParallelLinear(HIDDEN, HIDDEN * 2, bias=False,
                                                           prefix="model.layers.0.self_attn.q_b_proj")
            if "kv_a_proj_with_mqa" in layers:  # MLA's KV down-projection: replicated on every rank
                self.kv_a_proj_with_mqa = AscendReplicatedLinear(HIDDEN * 2, HIDDEN, bias=False,
                                                                 prefix="model.layers.0.self_attn.kv_a_proj_with_mqa")
            if "qkv_proj" in layers:
                self.qkv_proj = AscendQKVParallelLinear(HIDDEN, HEAD, HEADS, HEADS, bias=False,
                                                        prefix="model.layers.0.self_attn.qkv_proj")
            # a plain list: not this module's children or parameters (their weights are o_shard's)
            self.o_projs = [AscendRowParallelLinear(HIDDEN * 2, HIDDEN, bias=False,
                                                    prefix=f"model.layers.{i}.self_attn.o_proj")
                            for i in range(hidden_layers)]
            g = torch.Generator().manual_seed(rank)
            for p in self.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            if w8a8:
                _load_w8a8(self.o_proj, g)

        def forward(self, x):
            if "o_proj" in layers:
                x = _output(self.o_proj(x))
            if "dsv4" in layers:
                x = _output(self.wo_b(_output(self.wo_a(x))))
            if "mlp" in layers:
                gate, up = _output(self.gate_up_proj(x)).chunk(2, -1)
                x = _output(self.down_proj(torch.relu(gate) * up))
            if "gate_up_proj" in layers:
                x = _output(self.gate_up_proj(x))
            if "q_b_proj" in layers:
                x = _output(self.q_b_proj(x))
            if "kv_a_proj_with_mqa" in layers:
                x = _output(self.kv_a_proj_with_mqa(x))
            if "qkv_proj" in layers:
                x = _output(self.qkv_proj(x))
            return x

    return Layer()


def _w8a8_args(prefix: str) -> dict:
    """A W8A8 (static) layer as vllm-ascend builds it from a ModelSlim checkpoint's quant description, bf16."""
    from vllm_ascend.quantization.modelslim_config import AscendModelSlimConfig

    return {"quant_config": AscendModelSlimConfig({f"{prefix}.weight": "W8A8"}), "params_dtype": torch.bfloat16}


def _load_w8a8(layer, generator) -> None:
    """A W8A8 checkpoint's tensors (int8 weight, per-tensor activation scale, per-channel weight scale, int32 quant
    bias, float32 dequant scale = activation scale x weight scale), then vllm-ascend's own after-loading step."""
    n, k = layer.weight.shape
    layer.weight.data.copy_(torch.randint(-60, 61, (n, k), generator=generator, dtype=torch.int8))
    layer.input_scale.data.fill_(W8A8_INPUT_SCALE)
    layer.input_offset.data.zero_()
    weight_scale = torch.rand(n, 1, generator=generator) * 0.01 + 0.005
    layer.weight_scale.data.copy_(weight_scale)
    layer.weight_offset.data.zero_()
    layer.deq_scale.data.copy_(W8A8_INPUT_SCALE * weight_scale.flatten())
    layer.quant_bias.data.copy_(torch.randint(-500, 500, (n,), generator=generator, dtype=torch.int32))
    layer.quant_method.process_weights_after_loading(layer)


W8A8_INPUT_SCALE = 0.05


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
    model: str = "qwen3_moe"  # fine-grained TP: MoE models only (vllm-ascend's rule)
    prefill_node: bool = False  # a PD prefill node (kv_producer): vllm-ascend's layer_sharding needs one
    hidden_layers: int = 0  # the model's layers, each o_proj built (o_shard: 3 at least, for its prefetch step 1)
    token_shard: bool = False  # its input a FlashComm v1 forward's token shard (a MoE model's: every forward's)
    indexer: bool = False  # the model's config has DeepSeek V3.2's index_topk (vllm-ascend's DSA CP needs one)
    expert_parallel: bool = False  # a MoE model's enable_expert_parallel (set once the config is built: vLLM
    # checks it against the model's experts, and the layers here are dense)
    other_rows: tuple = ()  # fcpass's report rows of the ops' collectives that border no matmul here
    w8a8: bool = False  # o_proj a W8A8 (static) layer, the model bf16

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.w8a8 else torch.float32

    @property
    def input_width(self) -> int:
        """Attention's output (its heads split over vLLM's TP group: FlashComm2's o_proj takes them so), or the
        MLP's input."""
        if "o_proj" not in self.layers:
            return HIDDEN
        if "enable_dsa_cp" in self.switches:
            return HIDDEN * 2  # DSA CP's o_proj: every rank's whole weight, all of attention's output
        return HIDDEN * 2 * self.data_parallel_size // self.ranks


def _fine_grained(ranks: int, dp: int, size: int) -> Layout:
    """mlp_tp of ``size`` (and o_proj TP where TP=1, which vllm-ascend requires for it, with DeepSeek V4's
    wo_a / wo_b, which it gives its DSV4 ops then); vllm-ascend 0.30 requires its recompute scheduler with
    fine-grained TP (it keeps decode steps decode-shaped)."""
    oproj = ranks == dp
    sizes = {"mlp_tensor_parallel_size": size, **({"oproj_tensor_parallel_size": size} if oproj else {})}
    return Layout(ranks, dp, {"finegrained_tp_config": sizes, "recompute_scheduler_enable": True},
                  ("o_proj", "dsv4", "mlp") if oproj else ("mlp",),
                  {**({"o_proj": "OProjRowParallelOp", "wo_a": "DSV4OProjColumnParallelOp",
                       "wo_b": "DSV4OProjRowParallelOp"} if oproj else {}),
                   "gate_up_proj": "MLPColumnParallelOp", "down_proj": "MLPRowParallelOp"})


FLASHCOMM2, W8A8_FLASHCOMM2 = "TP=4, FlashComm2 otp=2", "TP=4, FlashComm2 otp=2, W8A8"
DSA_CP_OPS = {"q_b_proj": "ShardedCPColumnParallelOp", "kv_a_proj_with_mqa": "CustomReplicatedOp"}
# vllm-ascend 0.30 allows fine-grained TP with TP=1 only
LAYOUTS = {"DP=2, mlp_tp=2": _fine_grained(2, 2, 2), "DP=4, mlp_tp=2": _fine_grained(4, 4, 2)}
if ascend.TP_FLASHCOMM:
    LAYOUTS["DP=2 x TP=2, mlp_tp=2"] = _fine_grained(4, 2, 2)
    # FlashComm2 of TP=4 with o_proj TP 2: otp groups [0, 2] / [1, 3], odp [0, 1] / [2, 3]
    # FlashComm v1 (enable_flashcomm1, on in every layout here) on vLLM's TP group, in a dense model: the MLP's
    # gate_up_proj and down_proj are its sequence-parallel ops, FlashComm on in forwards above 1000 tokens
    LAYOUTS["TP=2, FlashComm v1"] = Layout(2, 1, {}, ("mlp",), {"gate_up_proj": "SequenceColumnParallelOp",
                                                               "down_proj": "SequenceRowParallelOp"},
                                           decode_node=False, model="llama")
    # matmul_allreduce: every row-parallel layer not taken by fine-grained TP (here attention's o_proj)
    LAYOUTS["TP=2, matmul_allreduce"] = Layout(2, 1, {"enable_matmul_allreduce": True}, ("o_proj",),
                                               {"o_proj": "MatmulAllreduceRowParallelOp"}, decode_node=False,
                                               model="llama")
    # DSA CP (enable_dsa_cp, with FlashComm v1, on a model with an indexer): q_b_proj's ShardedCP column op
    LAYOUTS["TP=2, DSA CP"] = Layout(2, 1, {"enable_dsa_cp": True}, ("q_b_proj", "kv_a_proj_with_mqa"),
                                     DSA_CP_OPS, decode_node=False, model="llama", indexer=True)
    # the same on a PD prefill node: o_proj's ShardedCP row op (vllm-ascend's "DSA CP with layer shard")
    LAYOUTS["TP=2, DSA CP, prefill node"] = Layout(2, 1, {"enable_dsa_cp": True}, ("o_proj",),
                                                   {"o_proj": "ShardedCPRowParallelOp"}, decode_node=False,
                                                   prefill_node=True, model="llama", indexer=True)
    # a dense model: FlashComm v1 off at TOKENS (o_proj's output gathered over vLLM's TP group), on above 1000
    LAYOUTS["TP=4, FlashComm2 otp=2"] = Layout(4, 1, {"enable_flashcomm2_parallel_size": 2}, ("o_proj",),
                                               {"o_proj": "Flashcomm2OProjRowParallelOp"}, decode_node=False,
                                               model="llama",
                                               other_rows=(("all_gather_mm", "vllm/-", report.NO_MATMUL_CONSUMER),))
    # the same with o_proj W8A8 (vllm-ascend quantizes, then all_to_alls the int8 tokens; weight_nz_mode 0: its
    # weight kept (k, n) as it is, not cast to the NPU's FRACTAL_NZ layout, which the stand-in has not)
    LAYOUTS[W8A8_FLASHCOMM2] = dataclasses.replace(LAYOUTS[FLASHCOMM2], w8a8=True, switches={
        "enable_flashcomm2_parallel_size": 2, "weight_nz_mode": 0})
    # FlashComm2's o_shard (layer_sharding ["o_proj"], on a PD prefill node): qkv_proj's op triggers the
    # broadcast of the next layer's o_proj weight; the o_projs are built (registered), never run (see above)
    LAYOUTS["TP=4, FlashComm2 otp=2, o_shard"] = Layout(
        4, 1, {"enable_flashcomm2_parallel_size": 2, "layer_sharding": ["o_proj"]}, ("qkv_proj",),
        {"qkv_proj": "Flashcomm2OshardQKVParallelOp"}, decode_node=False, prefill_node=True, hidden_layers=3,
        token_shard=True)
else:
    # 0.30: DSA CP where vLLM's use_sequence_parallel_moe holds (expert parallelism, TP > 1, DP > 1)
    LAYOUTS["DP=2 x TP=2, DSA CP"] = Layout(4, 2, {"enable_dsa_cp": True}, ("q_b_proj", "kv_a_proj_with_mqa"),
                                            DSA_CP_OPS, decode_node=False, model="llama", indexer=True,
                                            expert_parallel=True)
# layouts whose graph torch.compile cannot trace, with or without fcpass (the reason: the module docstring)
O_SHARD = "TP=4, FlashComm2 otp=2, o_shard"
DSA_CP_ROW = "TP=2, DSA CP, prefill node"
UNTRACEABLE = {O_SHARD, DSA_CP_ROW} & LAYOUTS.keys()
# layouts whose op cannot be built on a gloo rank (the module docstring)
UNBUILDABLE = {"TP=2, matmul_allreduce"} & LAYOUTS.keys()
# layouts whose ops run on gloo with FlashComm v1 off only; compiled again with it on (the module docstring)
FLASHCOMM_V1 = {"TP=2, FlashComm v1"} & LAYOUTS.keys()
FLASHCOMM_TOKENS = 1002  # vllm-ascend turns FlashComm v1 on for a dense model's forwards above 1000 tokens


def _pd_node(layout: Layout):
    """vllm-ascend takes o_proj TP (0.23) and any fine-grained TP (0.30) on a prefill/decode-disaggregated
    decode node only, layer_sharding on a prefill node only: its kv_transfer_config a KV consumer / producer (the
    connector is never started here)."""
    from vllm.config import KVTransferConfig

    if not (layout.decode_node or layout.prefill_node):
        return None
    return KVTransferConfig(kv_connector="ExampleConnector",
                            kv_role="kv_consumer" if layout.decode_node else "kv_producer")


def _own_groups(groups, layout: Layout) -> dict:
    """vllm-ascend's groups the layout's ops talk on, by name: their ranks and torch groups."""
    if "enable_flashcomm2_parallel_size" in layout.switches:
        getters = {"otp": "get_flashcomm2_otp_group", "odp": "get_flashcomm2_odp_group",
                   **({"shard_weight": "get_shard_weight_group"} if "layer_sharding" in layout.switches else {})}
    elif "finegrained_tp_config" in layout.switches:
        getters = {"mlp_tp": "get_mlp_tp_group"}
    else:
        return {}  # vLLM's TP group only
    if "oproj_tensor_parallel_size" in layout.switches.get("finegrained_tp_config", {}):
        getters["otp"] = "get_otp_group"
    return {name: getattr(groups, getter)() for name, getter in getters.items()}


def run_linear_ops(rank, world_size, name):
    import fcpass.vllm as fcpass_vllm
    from devtools.vllm_cpu import vllm_tp
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import set_current_vllm_config
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.utils import Range

    from fcpass.backends.base import FusedCall
    from fcpass.backends.npu import NpuBackend
    from fcpass.matmuls import Matmul

    layout = LAYOUTS[name]
    config = fcpass_vllm.compilation_config({"threshold_tokens": THRESHOLD})
    results = {}
    with vllm_tp(rank, world_size, config, ascend.additional_config(**layout.switches),
                 ascend.model_config(layout.model, layout.hidden_layers or None,
                                     **({"index_topk": 4} if layout.indexer else {})),
                 data_parallel_size=layout.data_parallel_size,
                 kv_transfer_config=_pd_node(layout)) as (vllm_config, tp), \
            torch.no_grad():
        if not ascend.TP_FLASHCOMM:
            # vllm-ascend 0.30 takes fine-grained TP in graph mode only, its graphs covering every decode step
            # (else it turns it off); vLLM's CPU platform turned graphs off (NPUs keep them): set as an NPU has them
            compilation = vllm_config.compilation_config
            compilation.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
            compilation.max_cudagraph_capture_size = vllm_config.scheduler_config.max_num_seqs
        if layout.expert_parallel:
            vllm_config.parallel_config.enable_expert_parallel = True
        ascend.init_config(vllm_config)
        ascend.load_ops()
        with ascend.parallel_groups(vllm_config) as groups:
            own = _own_groups(groups, layout)
            if name in UNBUILDABLE:
                return {"build": _raised(lambda: _layer(rank, layout.layers))}
            # as vLLM builds a model, where o_shard reads its layer count (the other layouts' ops read none)
            # (W8A8: vllm-ascend's quant config reads the model type there)
            with set_current_vllm_config(vllm_config) if layout.hidden_layers or layout.w8a8 else \
                    contextlib.nullcontext():
                model = _layer(rank, layout.layers, layout.hidden_layers, layout.w8a8)
            if layout.hidden_layers:
                results["o_projs"] = [type(o_proj.custom_op).__name__ for o_proj in model.o_projs]
                # what vllm-ascend's attention does after loading: o_shard's weights broadcast, its windows made
                from vllm_ascend.ops.flashcomm2_oshard_manager import flashcomm2_oshard_manager

                flashcomm2_oshard_manager.post_process_after_loading()
            results["ops"] = {name: type(layer.custom_op).__name__ for name, layer in model.named_children()}
            results["quant methods"] = sorted({  # vllm-ascend's quantized layers wrap theirs
                type(getattr(layer.quant_method, "quant_method", layer.quant_method)).__name__
                for layer in model.children()})
            results["groups"] = {"tp": tp.ranks, **{name: group.ranks for name, group in own.items()}}
            compile_range = Range(start=1, end=8192)
            manager, want_fn, got_fn = _without_and_with_fcpass(vllm_config, model, compile_range)
            rows = (lambda tokens: tokens // tp.world_size) if layout.token_shard else (lambda tokens: tokens)
            if name in UNTRACEABLE:
                x = torch.randn(rows(TOKENS[0]), layout.input_width)
                return {**results, "compile": _errors(vllm_config, compile_range, want_fn, got_fn, x, TOKENS[0]),
                        "fcpass's report": _report(manager)}
            for tokens in TOKENS:
                x = torch.randn(rows(tokens), layout.input_width,
                                generator=torch.Generator().manual_seed(tokens)).to(layout.dtype)
                with pass_context(compile_range), ascend.forward(vllm_config, tokens):
                    results[tokens] = ascend.want_and_got(want_fn, got_fn, x, eager_fn=model)
            results["report"] = _report(manager)
            if name == FLASHCOMM2:  # compiled again in a prefill's forward above 1000 tokens: FlashComm v1 on
                manager, want_fn, got_fn = _without_and_with_fcpass(vllm_config, model, compile_range)
                x = torch.randn(FLASHCOMM_TOKENS, layout.input_width, generator=torch.Generator().manual_seed(rank))
                with pass_context(compile_range), ascend.forward(vllm_config, FLASHCOMM_TOKENS) as context:
                    results["FlashComm on"] = {**ascend.want_and_got(want_fn, got_fn, x, eager_fn=model),
                                               "pad_size": context.pad_size, "report": _report(manager)}
            if name in FLASHCOMM_V1:  # compiled again in a forward with FlashComm v1 on, as its input's token shard
                manager, want_fn, got_fn = _without_and_with_fcpass(vllm_config, model, compile_range)
                x = torch.randn(FLASHCOMM_TOKENS // tp.world_size, layout.input_width)
                results["FlashComm on"] = {"errors": _errors(vllm_config, compile_range, want_fn, got_fn, x,
                                                             FLASHCOMM_TOKENS), "report": _report(manager)}
                # gate_up_proj alone (no matmul_and_reduce after it): the fused gather's numbers
                _, want_fn, got_fn = _without_and_with_fcpass(vllm_config, _layer(rank, ("gate_up_proj",)),
                                                              compile_range)
                with pass_context(compile_range), ascend.forward(vllm_config, FLASHCOMM_TOKENS):
                    results["FlashComm on"]["gate_up_proj alone"] = ascend.want_and_got(want_fn, got_fn, x)
            x, mm = torch.randn(8, HIDDEN), Matmul(torch.randn(HIDDEN, FFN), None)
            results["on A2"] = {(name, op): NpuBackend().unsupported(op, FusedCall(
                x=x, matmuls=(mm,), group=group.device_group, group_name=group.device_group.group_name,
                world_size=group.world_size, row_scale=None, pad_rows=0))
                for name, group in (own or {"tp": tp}).items() for op in ("mm_reduce_scatter", "all_gather_mm")}
    return results


def _without_and_with_fcpass(vllm_config, module, compile_range):
    """``module`` compiled (on its first call) through vllm-ascend's compile path: (fcpass's pass manager, whose
    last pass reports, the module without fcpass, with it)."""
    from vllm_ascend.compilation.graph_fusion_pass_manager import GraphFusionPassManager

    from fcpass.vllm.compilation import ASCEND_PASS_KEY
    from support.vllm_backend import configure_post_pass

    manager = configure_post_pass(vllm_config, GraphFusionPassManager(), ASCEND_PASS_KEY)
    return (manager, ascend.compiled(module, GraphFusionPassManager(), compile_range),
            ascend.compiled(module, manager, compile_range))


def _report(manager) -> list[tuple[str, str, str]]:
    """fcpass's report of the last graph it saw: (family, form, outcome constant) per site."""
    return sorted_rows(manager.passes[-1].last_report.rows())


def _errors(vllm_config, compile_range, want_fn, got_fn, x, tokens) -> dict:
    """What compiling and running a ``tokens`` forward on ``x`` raises, without fcpass and with it."""
    from vllm.compilation.passes.inductor_pass import pass_context

    errors = {}
    for label, fn in (("want", want_fn), ("got", got_fn)):
        with pass_context(compile_range), ascend.forward(vllm_config, tokens):
            errors[label] = _raised(lambda: fn(x))
    return errors


def _raised(call):
    """What ``call()`` raises: (the error, the function it was raised in), or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (what vllm-ascend's code or torch.compile raises is the finding)
        return f"{type(exc).__name__}: {exc}", traceback.extract_tb(exc.__traceback__)[-1].name
    return None


RUNS = {name: shared(run_linear_ops, name, world_size=layout.ranks, setup=ascend.compile_setup, timeout=420)
        for name, layout in LAYOUTS.items()}

NO_SITE = "no collective in the op: nothing for fcpass"
# op -> (what its graph holds, what fcpass does: its report row, NO_SITE, or None where it never compiles):
# docs/REFERENCE.md's table, row for row
OUTCOMES = {
    "OProjRowParallelOp": ("all_to_all_single on the otp group -> vllm.unquantized_gemm -> vllm.reduce_scatter on "
                           "the otp group", ("mm_reduce_scatter", "vllm/unquantized_gemm", "fused")),
    "MLPColumnParallelOp": ("vllm.all_gather on the mlptp group -> vllm.unquantized_gemm",
                            ("all_gather_mm", "vllm/unquantized_gemm", "fused")),
    "MLPRowParallelOp": ("vllm.unquantized_gemm -> vllm.reduce_scatter on the mlptp group",
                         ("mm_reduce_scatter", "vllm/unquantized_gemm", "fused")),
    "SequenceColumnParallelOp": ("vllm.maybe_all_gather_and_maybe_unpad on vLLM's TP group -> vllm.unquantized_gemm",
                                 ("all_gather_mm", "vllm_ascend/unquantized_gemm", "fused")),
    "SequenceRowParallelOp": ("vllm.matmul_and_reduce (its matmul and reduce_scatter on vLLM's TP group, in one op)",
                              ("mm_reduce_scatter", "vllm_ascend/-", report.OPAQUE_MATMUL)),
    # its source's, as it is never built on a gloo rank (test_matmul_allreduces_o_proj_is_never_built_on_gloo)
    "MatmulAllreduceRowParallelOp": ("torch_npu.npu_mm_all_reduce_base on vLLM's TP group (matmul and all_reduce, "
                                     "one NPU kernel)", None),
    # DeepSeek V4's attention output under o_proj TP: its matmuls on the otp group's shards, no collective in the op
    "DSV4OProjColumnParallelOp": ("vllm.unquantized_gemm (no collective)", NO_SITE),
    "DSV4OProjRowParallelOp": ("vllm.unquantized_gemm (no collective)", NO_SITE),
    # DSA CP's q_b_proj: its matmul on every rank's whole weight (a "fake comm group" of one)
    "ShardedCPColumnParallelOp": ("vllm.unquantized_gemm (no collective)", NO_SITE),
    # every replicated layer (MLA's kv_a_proj_with_mqa here): one matmul on every rank's whole weight
    "CustomReplicatedOp": ("vllm.unquantized_gemm (no collective)", NO_SITE),
    # its source's, as torch.compile never traces it (test_dsa_cps_o_proj_never_reaches_fcpass)
    "ShardedCPRowParallelOp": ("vllm.unquantized_gemm (no collective)", None),
    # traced with fcpass's pass installed (fcpass.traceable); with FlashComm v1 off, its output gathered over TP
    "Flashcomm2OProjRowParallelOp": ("all_to_all_single on the odp group -> vllm.unquantized_gemm -> "
                                     "vllm.reduce_scatter on the otp group (-> vllm.all_gather on vLLM's TP group "
                                     "where FlashComm v1 is off)",
                                     ("mm_reduce_scatter", "vllm/unquantized_gemm", "fused")),
    # its source's, as torch.compile never traces it (test_flashcomm2s_o_shard_qkv_proj_never_reaches_fcpass)
    "Flashcomm2OshardQKVParallelOp": ("maybe_all_gather_and_maybe_unpad on vLLM's TP group -> the next layer's "
                                      "o_proj weight broadcast on the shard_weight group (async) -> qkv_proj's "
                                      "matmul", None),
}
NEVER_COMPILED = "never reaches fcpass"


@pytest.mark.parametrize("name", [name for name in LAYOUTS
                                  if name not in UNTRACEABLE | UNBUILDABLE | FLASHCOMM_V1 | {W8A8_FLASHCOMM2}])
def test_its_ops_fuse_on_their_own_groups_and_give_the_same_numbers(name):
    per_rank = RUNS[name]()
    layout = LAYOUTS[name]
    for rank, r in enumerate(per_rank):
        assert r["ops"] == layout.ops
        assert len(r["groups"]["tp"]) == layout.ranks // layout.data_parallel_size
        rows = [OUTCOMES[op][1] for op in layout.ops.values() if OUTCOMES[op][1] != NO_SITE]
        assert r["report"] == sorted([*rows, *layout.other_rows])
        fused = [family for family, _, outcome in rows if outcome == "fused"]
        for tokens in TOKENS:
            run = r[tokens]
            path = "fused" if tokens > THRESHOLD else "unfused"
            assert {decision[:2] for decision in run["decisions"]} == {(family, path) for family in fused}, (
                tokens, run["decisions"])
            assert run["eager_bits"], tokens  # compiled without fcpass: vllm-ascend's op as it runs uncompiled
            if tokens <= THRESHOLD:  # the ops' own collectives and matmuls
                assert run["same_bits"] and run["calls"]["got"] == run["calls"]["want"], (tokens, run)
            else:
                assert run["error"] <= (FFN + 2) * torch.finfo(torch.float32).eps, (tokens, run["error"])
        for (group, op), reason in r["on A2"].items():
            if group == "tp":  # vLLM's TP group: the communicator A2 fuses on
                assert reason is None, (group, op, reason)
            else:
                assert "Atlas A2 fuses on one communicator" in reason, (group, op, reason)
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
        said = row if row == NO_SITE else f"{row[2]}: `{row[0]}`" if row else NEVER_COMPILED
        assert table[op][0] == graph and table[op][1].startswith(said), (op, table[op])


def test_flashcomm2s_o_proj_talks_on_its_odp_and_otp_groups():
    """0.23: vllm-ascend's FlashComm2 o_proj all_to_alls over the odp group (the TP ranks of one otp rank) and
    reduce-scatters over otp (every odp-th TP rank); torch.compile traces its all_to_all with fcpass's pass
    installed (``fcpass.traceable``; tests/runtime/test_traceable.py pins torch's own trace failing).
    0.30: vllm-ascend has no FlashComm2 op."""
    if not ascend.TP_FLASHCOMM:
        assert "class Flashcomm2OProjRowParallelOp" not in (ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        return
    for rank, r in enumerate(RUNS[FLASHCOMM2]()):
        assert r["groups"]["otp"] == [rank % 2, rank % 2 + 2]
        assert r["groups"]["odp"] == [rank // 2 * 2, rank // 2 * 2 + 1]


def test_flashcomm2s_o_proj_fuses_in_a_prefill_with_flashcomm_v1_on():
    """0.23: FlashComm2 as vllm-ascend recommends it, with FlashComm v1, in a prefill's forward above 1000 tokens:
    o_proj pads the tokens to a multiple of the TP size, and its output stays this rank's token shard (no TP
    gather). fcpass fuses its matmul -> reduce_scatter on the otp group: the shard's rows, the numbers within
    float32's bound, vllm-ascend's op uncompiled the reference's bits."""
    if not ascend.TP_FLASHCOMM:  # 0.30: no FlashComm2 switch at all
        assert FLASHCOMM2 not in LAYOUTS and "enable_flashcomm2_parallel_size" not in (
            ascend.SOURCE / "vllm_ascend/ascend_config.py").read_text()
        return
    layout = LAYOUTS[FLASHCOMM2]
    for r in RUNS[FLASHCOMM2]():
        on = r["FlashComm on"]
        assert on["pad_size"] == -FLASHCOMM_TOKENS % layout.ranks
        assert on["rows"] == (FLASHCOMM_TOKENS + on["pad_size"]) // layout.ranks
        assert on["report"] == [OUTCOMES["Flashcomm2OProjRowParallelOp"][1]]
        assert [decision[:2] for decision in on["decisions"]] == [("mm_reduce_scatter", "fused")], on["decisions"]
        assert on["eager_bits"] and on["error"] <= (FFN + 2) * torch.finfo(torch.float32).eps, on


def test_flashcomm2s_w8a8_o_proj_fuses_its_quantized_matmul_with_the_same_bits():
    """0.23: FlashComm2's o_proj as a W8A8 (static) checkpoint gives it: vllm-ascend quantizes attention's output
    (``vllm.quantize``), all_to_alls the int8 tokens over odp, then ``npu_quant_matmul`` -> reduce_scatter over otp.
    fcpass fuses the quantized matmul with the scatter (``mm_reduce_scatter_scaled``) and gives the same bits on
    both sides of the threshold: the int8 products are exact (|x| <= 127, |w| <= 60, k = 32: every partial sum
    under 2**24, in any order), the dequantization is per element, and two ranks' sums commute."""
    if not ascend.TP_FLASHCOMM:  # 0.30: no FlashComm2 switch at all
        assert W8A8_FLASHCOMM2 not in LAYOUTS
        return
    layout = LAYOUTS[W8A8_FLASHCOMM2]
    for r in RUNS[W8A8_FLASHCOMM2]():
        assert r["ops"] == layout.ops and r["quant methods"] == ["AscendW8A8LinearMethod"]
        assert r["report"] == sorted([("mm_reduce_scatter", "vllm/npu_quant_matmul", "fused"), *layout.other_rows])
        for tokens in TOKENS:
            run = r[tokens]
            path = "fused" if tokens > THRESHOLD else "unfused"
            assert [decision[:2] for decision in run["decisions"]] == [("mm_reduce_scatter_scaled", path)], run
            assert run["eager_bits"] and run["same_bits"], (tokens, run)
            if tokens <= THRESHOLD:
                assert run["calls"]["got"] == run["calls"]["want"], (tokens, run)


def test_flashcomm_v1s_ops_fuse_the_gather_and_leave_the_opaque_reduction():
    """0.23: vllm-ascend's FlashComm v1 MLP on vLLM's TP group. Off (a dense model's forward of up to 1000 tokens)
    its gather is no collective and its reduction is the opaque ``matmul_and_reduce``: nothing to fuse, the same
    bits and calls. On, fcpass fuses the gather into gate_up_proj and leaves ``matmul_and_reduce``, which then
    fails on a gloo rank without fcpass as with it: it asks vLLM's TP group for its "npu" backend's HCCL comm
    name (for its own ``npu_mm_reduce_scatter_base``), and torch has no "npu" device here. 0.30 has neither op."""
    if not ascend.TP_FLASHCOMM:
        source = (ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        assert "class SequenceColumnParallelOp" not in source and "class SequenceRowParallelOp" not in source
        return
    (name,) = FLASHCOMM_V1
    layout = LAYOUTS[name]
    row = OUTCOMES["SequenceRowParallelOp"][1]
    for r in RUNS[name]():
        assert r["ops"] == layout.ops
        assert r["report"] == [row]
        for tokens in TOKENS:
            run = r[tokens]
            assert run["decisions"] == [] and run["same_bits"] and run["calls"]["got"] == run["calls"]["want"], (
                tokens, run)
        assert r["on A2"] == {("tp", op): None for op in ("mm_reduce_scatter", "all_gather_mm")}
        on = r["FlashComm on"]
        assert on["report"] == sorted(OUTCOMES[op][1] for op in layout.ops.values())
        column = on["gate_up_proj alone"]  # the fused gather, above the threshold: every rank's rows, the numbers
        assert column["rows"] == FLASHCOMM_TOKENS and column["error"] <= (FFN + 2) * torch.finfo(torch.float32).eps
        assert [decision[:2] for decision in column["decisions"]] == [("all_gather_mm", "fused")], column
        for label, error in on["errors"].items():
            assert error == (NPU_DEVICE_ERROR, "matmul_and_reduce"), (label, error)


NPU_DEVICE_ERROR = ("RuntimeError: Expected one of cpu, cuda, ipu, xpu, mkldnn, opengl, opencl, ideep, hip, ve, fpga, "
                    "maia, xla, lazy, vulkan, mps, meta, hpu, mtia, privateuseone device type at start of device "
                    "string: npu")  # torch without torch_npu's "npu" device (the stand-in is not installed here)


def test_matmul_allreduces_o_proj_is_never_built_on_gloo():
    """0.23: vllm-ascend's ``enable_matmul_allreduce`` row op asks vLLM's TP group for its "npu" backend's HCCL
    comm name as the layer is built (for its own ``npu_mm_all_reduce_base``, torch_npu's matmul + all_reduce
    kernel): no "npu" device on a gloo rank, no layer, no graph. 0.30 has no such op."""
    if not ascend.TP_FLASHCOMM:
        assert "class MatmulAllreduceRowParallelOp" not in (ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        return
    (name,) = UNBUILDABLE
    for r in RUNS[name]():
        assert r["build"] == (NPU_DEVICE_ERROR, "get_hcomm_info")


def test_flashcomm2s_o_shard_qkv_proj_never_reaches_fcpass():
    """0.23: vllm-ascend's o_shard qkv_proj (FlashComm2 with ``layer_sharding: ["o_proj"]``, on a prefill node)
    triggers the broadcast of the next layer's o_proj weight before its matmul, and torch.compile's trace fails
    there, without fcpass as with it, before any pass runs: on that weight's source rank at ``dist.broadcast``'s
    pybind ``BroadcastOptions()``, on the others at the ``set_`` pointing that weight at its prefetch window.
    0.30 has no such op."""
    if not ascend.TP_FLASHCOMM:
        assert "class Flashcomm2OshardQKVParallelOp" not in (
            ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        return
    layout = LAYOUTS[O_SHARD]
    for rank, r in enumerate(RUNS[O_SHARD]()):
        assert r["ops"] == layout.ops
        assert r["o_projs"] == ["Flashcomm2OProjRowParallelOp"] * layout.hidden_layers  # registered with o_shard
        assert r["groups"]["shard_weight"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        source = rank % 2 == 1  # layer 1's o_proj weight: held by rank 1 of each shard_weight group
        for label in ("want", "got"):
            error, where = r["compile"][label]
            assert where == "compile_wrapper" and "trigger_broadcast_for_layer" in error, (label, error)
            if source:
                assert error.startswith("Unsupported: Attempted to call function marked as skipped") and (
                    "pybind11_object.__new__" in error and "opts = BroadcastOptions()" in error), (label, error)
            else:
                assert error.startswith("Unsupported: Unsupported function call (delayed)") and (
                    "weight.set_" in error and "Getting an inplace view on a graph input is not supported" in error
                    and "next_layer.weight.set_(window.weight)" in error), (label, error)
        assert r["fcpass's report"] == []


def test_dsa_cps_o_proj_never_reaches_fcpass():
    """0.23: DSA CP on a PD prefill node gives o_proj vllm-ascend's ``ShardedCPRowParallelOp`` (every rank's whole
    weight, no collective). Traced, its ``tp_rank`` builds a ``SimpleNamespace`` per call and Dynamo stops there,
    without fcpass as with it, before any pass runs; in vllm-ascend's model the op runs inside DSA's attention
    op, which vLLM's graph keeps opaque. 0.30 has no such op."""
    if not ascend.TP_FLASHCOMM:
        assert "class ShardedCPRowParallelOp" not in (ascend.SOURCE / "vllm_ascend/ops/linear_op.py").read_text()
        return
    for r in RUNS[DSA_CP_ROW]():
        assert r["ops"] == LAYOUTS[DSA_CP_ROW].ops
        for label in ("want", "got"):
            error, _ = r["compile"][label]
            assert error.startswith("Unsupported") and "SimpleNamespace" in error, (label, error)
        assert r["fcpass's report"] == []


# the layouts whose switches the hardware check's part 3 runs, by the op it asks the release for
CHECKED_LAYOUTS = {"SequenceColumnParallelOp": "TP=2, FlashComm v1", "Flashcomm2OProjRowParallelOp": FLASHCOMM2}


def run_check_switches(rank, world_size):
    """The hardware check's part 3 runs (fcpass/checks/ascend.py) on this release's real ``linear_op``, with 4
    NPUs and with 2; and the additional_config of each layout they stand for, as these tests give it."""
    from vllm_ascend.ops import linear_op

    from fcpass.checks.ascend import linear_switches

    given = {op: ascend.additional_config(**LAYOUTS[name].switches) for op, name in CHECKED_LAYOUTS.items()
             if name in LAYOUTS}
    return {"runs": {npus: linear_switches(linear_op, npus) for npus in (4, 2)}, "given": given}


CHECK_SWITCHES = shared(run_check_switches, setup=ascend.compile_setup, timeout=120)


def test_the_hardware_checks_engine_runs_are_these_layouts():
    """``make ascend-check``'s part 3 runs vllm-ascend's engine on hardware with the switches of this table's rows
    (each at its TP size, vllm-ascend's additional_config as these layouts give it), where this release has
    their op, and says why it skips the rest."""
    from fcpass.checks.ascend import LINEAR_SWITCHES

    (found, *_) = CHECK_SWITCHES()
    runs = found["runs"]
    if not ascend.TP_FLASHCOMM:  # 0.30: neither op
        assert all(isinstance(run, str) and run.startswith("skipped: this vllm-ascend has no")
                   for npus in (4, 2) for _, run in runs[npus]), runs
        return
    for (what, tp, _, op), (said, args) in zip(LINEAR_SWITCHES, runs[4], strict=True):
        layout = LAYOUTS[CHECKED_LAYOUTS[op]]
        assert said == what and op in layout.ops.values() and args["tensor_parallel_size"] == tp == layout.ranks
        switches = {key: value for key, value in args["additional_config"].items()
                    if key != "ascend_compilation_config"}  # its own: npugraph_ex off, so that fcpass runs
        assert switches == {key: found["given"][op][key] for key in switches}, (switches, found["given"][op])
    assert [run for _, run in runs[2]][1] == "skipped: it needs 4 NPUs, 2 visible"
