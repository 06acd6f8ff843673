"""A real vLLM Llama at TP=N on CPU gloo ranks, compiled with (vLLM's SP or none) + a post-grad pass: the tests' harness.

Inside one rank of a 2-rank (or N-rank) gloo run started by
``fcpass.launch.run_ranks(fn, world_size, ..., setup=rank_setup)``,
:func:`compile_and_run` builds a small vLLM Llama with random weights at
TP=world_size, compiles it with Inductor with vLLM's SequenceParallelismPass
(``vllm_sp=True``, vLLM <= 0.31) or none (the plain TP graph, for fcpass's
own SP) followed by an arbitrary extra post-grad pass, runs it, runs the
same model eagerly (plain TP, no compile) as the reference, and returns what
the extra pass saw (op counts and graph text before/after it) and the numbers.

The model (``MODEL_KINDS``)
---------------------------
- ``"llama"``: vLLM's own ``vllm.model_executor.models.llama.LlamaModel`` class
  (``VocabParallelEmbedding`` -> 2 ``LlamaDecoderLayer`` s -> final ``RMSNorm``),
  hidden 256, intermediate 512, 4 heads / 2 KV heads, vocab 1024, fp32,
  called as vLLM calls it: ``model(input_ids[s], positions[s], None)``.
  Only two things differ from vLLM: the class is subclassed with
  ``@ignore_torch_compile`` (so its ``@support_torch_compile`` wrapper does not
  compile it with vLLM's own backend; the harness compiles it), and it is
  given a stand-in ``model_config`` carrying only ``hf_config`` (a real
  ``ModelConfig`` needs a checkpoint directory), see ``_ModelVllmConfig``.
- ``"llama_bias"``: the same, built from ``LlamaConfig(attention_bias=True,
  mlp_bias=True)``: qkv_proj / gate_up_proj (column parallel) carry their
  bias shard on every rank, o_proj / down_proj (``RowParallelLinear``) carry
  a bias that vLLM adds **on rank 0 only** (``bias_ = None if (self.tp_rank >
  0 or self.skip_bias_add) else self.bias``). So the rank graphs really
  differ: on rank 0 the o_proj/down_proj matmuls are ``aten.addmm(bias, x,
  permute(w))`` feeding ``vllm.reduce_scatter``; on rank 1 they are
  ``aten.mm(x, permute(w))`` (the column-parallel matmuls are ``addmm`` on
  both ranks): rank 0 has 8 addmm, rank 1 4 mm + 4 addmm.
  Note that the ranks' graphs differ a little in every kind, bias or not:
  the embedding's vocab-range mask has rank-dependent constants and one more
  ``aten.mul``/``aten.add`` on rank 1 (rank 0 a dead ``aten.full``), and the
  dead symbolic-size arithmetic SP leaves behind (``operator.mul(0, s)`` on
  rank 0 only). Compare op counts across ranks per op, not whole Counters.
- ``"llama_3d"``: vLLM's Llama is token-major 2-D by design (``[num_tokens,
  hidden]``; the model runner flattens batches). Feeding it 3-D ``[1, s,
  hidden]`` runs eagerly (embedding, norms, rotary, linears all accept leading
  dims), but vLLM 0.31's SequenceParallelismPass then emits
  ``reduce_scatter(x, dim=0)`` on the batch dim of size 1: the shards are
  ``[0, s, H]`` and Inductor fails compiling (verified: ``shape '[s72, 256]'
  is invalid for input of size 0``). So the 3-D variant is the 2-D model with
  every linear layer's kernel wrapped as
  ``F.linear(x.unsqueeze(0), w, b).squeeze(0)``: the linears see 3-D
  ``[1, s, k]`` input, and the post-grad graph has views around each matmul,
  ``unsqueeze(x, 0) -> aten.reshape([s, k]) -> aten.mm -> aten.reshape([1, s, n])
  -> aten.squeeze.dim(0)`` (Inductor turns the decomposition's ``view`` s into
  ``reshape``), i.e. ``all_gather -> unsqueeze -> reshape -> mm`` and
  ``mm -> reshape -> squeeze -> reduce_scatter``, while collectives and norms
  stay 2-D as in vLLM. No bias (as "llama").

Attention: vLLM's ``Attention`` needs a KV cache and a forward context. The
test model replaces it (only while the model is built) with
``_CausalAttention``, which calls an opaque custom op
``fcpass_demo::causal_sdpa`` (causal SDPA over the rank's heads,
with a fake impl). Everything else is vLLM's code.

Graph counts after SP (2 layers, every kind, each rank): 5
``vllm.reduce_scatter.default`` (the embedding's, after a masked ``where``,
no matmul; o_proj and down_proj of each layer), 5 ``vllm.all_gather.default``
(before qkv_proj and gate_up_proj of each layer; one after the final norm
feeding no matmul), 8 matmuls, no ``vllm.all_reduce``. Collectives are all
positional: ``reduce_scatter(x, 0, 2, 'tp:0')``. The group name is
``tp:<k>`` where k counts the TP groups this process created (``tp:1`` on a
second ``compile_and_run`` in the same rank).

What it takes on CPU (../shared/VLLM_CPU.md, steps 1-8), each done here:
1. custom-op collectives: ``rank_setup`` (pass it as run_ranks' ``setup``)
   switches them on before distributed init; ``compile_and_run`` re-applies
   it and checks the TP group really uses them;
2. vLLM's CPU ``vllm.all_reduce`` reduces in place and returns its input:
   ``_all_reduce_clone_fix`` reduces a clone (compiled and eager);
3. Inductor ``pre_grad_custom_pass`` = ``VllmIRInplaceFunctionalizationPass``;
4. compiled calls run inside ``pass_context(Range(1, max_tokens))``;
5. Inductor FX graph cache and the autograd cache off (config patches, plus
   the env that fcpass.launch sets), and the combined pass has ``uuid() ->
   None`` so Inductor never caches a graph compiled with it;
6. one seed on every rank (replicated norm weights match; TP shards of one
   rank are not slices of a common global weight, which does not matter:
   the reference is the same TP model run eagerly);
7. every linear layer's ``cpu_linear`` = ``F.linear`` (gives ``aten.mm`` /
   ``aten.addmm`` in the post-grad graph);
8. ``SequenceParallelismPass(vllm_config)`` built directly and called directly
   (its ``is_applicable_for_range`` needs a model config).

Token counts: SequenceParallelismPass does not pad; its reduce_scatter needs
the token count divisible by the world size. vLLM 0.31 pads outside the
graph instead (``GPUModelRunner._pad_for_sequence_parallelism``:
``round_up(num_tokens, tp_size)``). The harness does the same: the compiled
model gets the input padded to a multiple of world_size (token id 0,
position 0), and the first ``n`` rows of its output are compared with the
eager model on the unpadded ``n`` tokens (causal attention: padding rows at
the end cannot change earlier rows). So any count works, e.g. 7. (Without
the padding an odd count fails in Inductor's post-grad fake-tensor update:
``shape '[s72, -1, 64]' is invalid for input of size 256*((s72//2))``.)

The eager reference runs under ``torch.compiler.set_stance("force_eager")``:
vLLM's VocabParallelEmbedding calls a helper decorated with its own
``torch.compile(dynamic=True)``, which would otherwise be compiled on its own
by Inductor, with this harness's post-grad pass, as extra graphs.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import time
import uuid as _uuid

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import fcpass

MODEL_KINDS = ("llama", "llama_bias", "llama_3d")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 1024
RMS_NORM_EPS = 1e-5  # SequenceParallelismPass registers its patterns for 1e-5 and 1e-6
DEFAULT_TOKEN_COUNTS = (7, 8, 64, 2048)


# --------------------------------------------------------------------------- rank setup

def rank_setup():
    """run_ranks ``setup``: vLLM custom-op collectives on, before distributed init (VLLM_CPU.md step 1)."""
    _custom_op_collectives_on()


def _custom_op_collectives_on():
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if not getattr(cls, "_fcpass_custom_op_collectives", False):
        cls.use_custom_op_collectives = classmethod(lambda cls: True)
        cls._fcpass_custom_op_collectives = True


# --------------------------------------------------------------------------- attention stand-in

@torch.library.custom_op("fcpass_demo::causal_sdpa", mutates_args=())
def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> torch.Tensor:
    """Causal SDPA over one rank's heads; q [..., tokens, heads*d], k/v [..., tokens, kv_heads*d]."""
    shape = q.shape
    q, k, v = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])
    tokens, group = q.shape[0], num_heads // num_kv_heads
    qh = q.view(tokens, num_heads, head_dim).transpose(0, 1)
    kh = k.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    vh = v.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return out.transpose(0, 1).reshape(shape)


@causal_sdpa.register_fake
def _(q, k, v, num_heads, num_kv_heads, head_dim):
    return q.new_empty(q.shape)


class _CausalAttention(torch.nn.Module):
    """Stands in for vLLM's ``Attention`` (same constructor): no KV cache, no forward context."""

    def __init__(self, num_heads, head_dim, scaling, num_kv_heads=None, **_):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.num_kv_heads = num_kv_heads or num_heads

    def forward(self, q, k, v):
        return torch.ops.fcpass_demo.causal_sdpa(q, k, v, self.num_heads, self.num_kv_heads,
                                                          self.head_dim)


# --------------------------------------------------------------------------- model

class _ModelConfigStandIn:
    def __init__(self, hf_config):
        self.hf_config = hf_config


class _ModelVllmConfig:
    """The VllmConfig as the model constructor sees it: the real one, plus ``model_config.hf_config``.

    vLLM's Llama classes read ``vllm_config.model_config.hf_config``; a real
    ModelConfig needs a checkpoint directory and would also switch on
    config-driven behaviour (compile ranges, SP thresholds) the harness does
    not want. Everything else (quant_config=None, cache_config,
    compilation_config, ...) comes from the real config.
    """

    def __init__(self, base, hf_config):
        self._base, self.model_config = base, _ModelConfigStandIn(hf_config)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _test_llama_model_class():
    from vllm.compilation.decorators import ignore_torch_compile
    from vllm.model_executor.models.llama import LlamaModel

    @ignore_torch_compile
    class TestLlamaModel(LlamaModel):
        """vLLM's LlamaModel, not compiled by vLLM's @support_torch_compile wrapper (the harness compiles it)."""

    return TestLlamaModel


class _Runner(torch.nn.Module):
    """Calls the model as vLLM's model runner does: ``model(input_ids, positions, intermediate_tensors=None)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions):
        return self.model(input_ids, positions, None)


def _linear_3d(x, weight, bias=None):
    """The linear kernel of the "llama_3d" variant: the matmul sees [1, s, k] input."""
    return torch.nn.functional.linear(x.unsqueeze(0), weight, bias).squeeze(0)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def build_model(kind, vllm_config, seed=0, layers=LAYERS):
    """The model of ``kind`` on this rank with ``layers`` decoder layers, random weights from ``seed`` (call inside
    vLLM's TP context)."""
    from transformers import LlamaConfig
    from vllm.model_executor.layers.linear import LinearBase
    import vllm.model_executor.models.llama as llama

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {MODEL_KINDS}")
    bias = kind == "llama_bias"
    hf_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_hidden_layers=layers, rms_norm_eps=RMS_NORM_EPS,
        max_position_embeddings=4096, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    with _patched(llama, "Attention", _CausalAttention):
        model = _test_llama_model_class()(vllm_config=_ModelVllmConfig(vllm_config, hf_config), prefix="model")
    # VLLM_CPU.md step 6: the same generator on every rank, parameters in the same order and shapes
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:  # linear weights and biases
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    # VLLM_CPU.md step 7: vLLM picks its CPU linear kernel when weights load; use F.linear
    linear = _linear_3d if kind == "llama_3d" else torch.nn.functional.linear
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.cpu_linear = linear
    return _Runner(model).eval()


# --------------------------------------------------------------------------- the post-grad pass

def op_counts(graph) -> collections.Counter:
    """Counter of ``str(node.target)`` over the graph's call_function nodes."""
    return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


class SPThenExtraPass(CustomGraphPass):
    """vLLM's SequenceParallelismPass (if given), then the pass under test; records the graph around the latter.

    ``records`` gets one dict per Inductor compilation: counts_before /
    counts_after (Counter), graph_before / graph_after (``str(graph)``),
    sp_matched. With ``tail`` (a list of vLLM passes) those run afterwards,
    as vLLM's PostGradPassManager runs its cleanup/IR lowering/functionalization
    fix after the user's pass.

    ``uuid()`` is None on purpose: Inductor then never caches (or serves from
    cache) a graph compiled with this pass, so the pass always runs and records.
    """

    def __init__(self, sp_pass, extra_pass=None, tail=(), stop_after=False):
        self.sp_pass, self.extra_pass, self.tail = sp_pass, extra_pass, list(tail)
        self.stop_after = stop_after
        self.records: list[dict] = []

    def __call__(self, graph):
        if self.sp_pass is not None:
            self.sp_pass(graph)
        record = {"sp_matched": getattr(self.sp_pass, "matched_count", None),
                  "counts_before": op_counts(graph), "graph_before": str(graph)}
        if self.extra_pass is not None:
            self.extra_pass(graph)
            graph.lint()
        record["counts_after"], record["graph_after"] = op_counts(graph), str(graph)
        self.records.append(record)
        if self.stop_after:
            raise _GraphsRecorded()
        for pass_ in self.tail:
            pass_(graph)

    def uuid(self):
        return None


class _GraphsRecorded(Exception):
    """Raised by the pass to end a compile-only run before the compiled graph runs."""


# --------------------------------------------------------------------------- vLLM CPU fixes

@contextlib.contextmanager
def _all_reduce_clone_fix():
    """VLLM_CPU.md step 2: vLLM's CPU out-of-place all_reduce reduces its input in place; reduce a clone."""
    from vllm.distributed import parallel_state

    coordinator = parallel_state.GroupCoordinator
    out_of_place = coordinator._all_reduce_out_place
    if getattr(out_of_place, "_fcpass_clone_fix", False):  # already applied by an outer caller
        yield
        return

    def all_reduce_out_place(self, input_):
        return out_of_place(self, input_.clone())

    all_reduce_out_place._fcpass_clone_fix = True
    with _patched(coordinator, "_all_reduce_out_place", all_reduce_out_place):
        yield


def agree_on_dist_ident():
    """vLLM's CPU shared-memory communicator names its segment from VLLM_DIST_IDENT: one fresh name per call."""
    import torch.distributed as dist

    name = [f"fcpass-test-{_uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(name, src=0)
    os.environ["VLLM_DIST_IDENT"] = name[0]


class ByValueTensor(torch.Tensor):
    """A tensor that pickles by value, so it survives the trip from a rank back to run_ranks' caller.

    torch.multiprocessing sends plain tensors through a queue as shared-memory
    file descriptors served by the sending process; a rank returns its result
    and exits, so the caller can find the sender gone (``FileNotFoundError``
    in ``rebuild_storage_fd``). This subclass pickles as ``torch.save`` bytes
    and arrives as a plain ``torch.Tensor``. In the rank it is a tensor.
    """

    def __reduce_ex__(self, protocol):
        buffer = io.BytesIO()
        torch.save(self.as_subclass(torch.Tensor).detach().clone(), buffer)
        return (_tensor_from_bytes, (buffer.getvalue(),))


def _tensor_from_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)


def by_value(tensor):
    """``tensor`` as a :class:`ByValueTensor` (safe to return from a rank)."""
    return tensor.detach().clone().as_subclass(ByValueTensor)


def _pad_to_multiple(n, multiple):
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------- entry point

@contextlib.contextmanager
def vllm_tp(rank, world_size, compilation_config=None):
    """vLLM's config and TP=world_size group in this rank (VLLM_CPU.md steps 1, 2): yields (vllm_config, tp_group).

    Call inside a rank of ``run_ranks(..., setup=rank_setup)``. ``compilation_config``
    (a dict or vLLM CompilationConfig, e.g. from ``fcpass.vllm.compilation_config``)
    goes into the VllmConfig as a user's would.
    """
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    _custom_op_collectives_on()
    agree_on_dist_ident()
    vllm_config = VllmConfig() if compilation_config is None else VllmConfig(compilation_config=compilation_config)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_all_reduce_clone_fix())
        stack.enter_context(set_current_vllm_config(vllm_config))
        parallel_state.init_distributed_environment(
            world_size=world_size, rank=rank, local_rank=rank, backend="gloo", distributed_init_method="env://")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        stack.callback(parallel_state.destroy_model_parallel)
        tp_group = parallel_state.get_tp_group()
        if not tp_group.use_custom_op_call:
            raise RuntimeError("vLLM TP group does not use custom-op collectives: pass setup=rank_setup to "
                               "run_ranks (VLLM_CPU.md step 1)")
        yield vllm_config, tp_group


def compile_and_run(rank, world_size, kind, token_counts=DEFAULT_TOKEN_COUNTS, extra_pass_factory=None, seed=0,
                    vllm_tail_passes=True, run_compiled=True, compilation_config=None, timed_repeats=0,
                    vllm_sp=True, layers=LAYERS):
    """Build ``kind`` at TP=world_size, compile with SP + an extra pass, run it and the eager reference.

    ``vllm_sp=False``: no vLLM SequenceParallelismPass (vLLM 0.32+ has none):
    the extra pass sees the plain TP graph (``aten.mm -> vllm.all_reduce``),
    and the compiled model gets the unpadded token counts (only vLLM's SP
    needs them padded). Compiled calls run inside vLLM's pass context with
    the compile range ``[min(token counts), max]``.

    ``layers``: decoder layers (default ``LAYERS``, what the tests expect;
    benchmarks/pass_cost.py builds deeper models).

    The extra pass is the user pass of ``compilation_config`` (the
    ``post_grad_custom_post_pass`` that vLLM's config holds after taking it in,
    as vLLM's pass manager would run it after SP), else ``extra_pass_factory()``.

    Call inside a rank of ``run_ranks(..., setup=rank_setup)`` (torch.distributed
    already initialized). ``extra_pass_factory()`` is called once, inside
    vLLM's config/TP context, and returns a callable taking a torch.fx.Graph
    and mutating it in place; the factory reaches the rank through
    run_ranks' arguments, so it must pickle (a module-level function or a
    ``functools.partial`` of one, not a lambda). ``torch._dynamo.reset()`` is
    called first (one model per call; several calls per rank are fine).

    ``vllm_tail_passes``: after the extra pass, run what vLLM's
    PostGradPassManager runs after a user pass (cleanup, vLLM IR lowering of
    the norms to aten, clone elimination, cleanup, functionalization fix), so
    the compiled code is what vLLM would run. The recorded graphs are taken
    before them either way. With False the norms stay opaque ``vllm_ir`` ops
    and even token counts match the eager reference bit for bit.

    Returns (picklable) {"outputs", "reference", "max_rel_error": lists, one
    per token count, outputs unpadded to the count, tensors as
    :class:`ByValueTensor` (plain tensors once returned from the rank);
    "counts_before", "counts_after": Counter of op targets around the extra
    pass; "graph_before", "graph_after": ``str(graph)``; "compilations":
    Dynamo compilations (``counters["stats"]["unique_graphs"]``);
    "post_grad_calls": times the post-grad pass ran; "sp_matched": SP sites
    replaced; "token_counts", "padded_counts"; "tp_group": the group name in
    the graph}. Graph records are from the first compilation.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.ir.inplace_functionalization import VllmIRInplaceFunctionalizationPass
    from vllm.config.utils import Range

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; one of {MODEL_KINDS}")
    token_counts = tuple(int(n) for n in token_counts)
    padded_counts = tuple(_pad_to_multiple(n, world_size if vllm_sp else 1) for n in token_counts)
    torch._dynamo.reset()
    counters.clear()

    with contextlib.ExitStack() as stack:
        vllm_config, tp_group = stack.enter_context(vllm_tp(rank, world_size, compilation_config))

        model = build_model(kind, vllm_config, seed, layers)
        extra_pass = vllm_config.compilation_config.inductor_compile_config.get("post_grad_custom_post_pass")
        if extra_pass is None and extra_pass_factory is not None:
            extra_pass = extra_pass_factory()
        tail = _vllm_tail_passes(vllm_config) if vllm_tail_passes else ()
        post_grad = SPThenExtraPass(_vllm_sp_pass(vllm_config) if vllm_sp else None, extra_pass, tail,
                                    stop_after=not run_compiled)
        stack.enter_context(inductor_config.patch({
            "pre_grad_custom_pass": VllmIRInplaceFunctionalizationPass(vllm_config),
            "post_grad_custom_post_pass": post_grad,
            "fx_graph_cache": False,
        }))
        stack.enter_context(functorch_config.patch({"enable_autograd_cache": False}))
        compiled = torch.compile(model, backend="inductor", fullgraph=True)

        outputs, reference, errors, decisions, times_ms = [], [], [], [], []
        with torch.no_grad(), pass_context(Range(min(padded_counts), max(padded_counts))):
            if not run_compiled:
                _compile_only(compiled, padded_counts[0])
            for n, padded in zip(token_counts if run_compiled else (), padded_counts):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + n)  # same inputs on every rank
                input_ids = torch.randint(0, VOCAB, (n,), generator=gen)
                positions = torch.arange(n)
                with torch.compiler.set_stance("force_eager"):  # vLLM's own nested torch.compile'd helpers too
                    want = model(input_ids, positions)
                # vLLM pads the batch to a multiple of the TP size outside the graph (token 0, position 0)
                ids_p = torch.nn.functional.pad(input_ids, (0, padded - n))
                pos_p = torch.nn.functional.pad(positions, (0, padded - n))
                torch._dynamo.mark_dynamic(ids_p, 0)
                torch._dynamo.mark_dynamic(pos_p, 0)
                fcpass.reset_decision_counts()
                got = compiled(ids_p, pos_p)[:n]
                decisions.append(fcpass.decision_counts())
                if timed_repeats:
                    times_ms.append(_mean_ms(lambda: compiled(ids_p, pos_p), timed_repeats))
                outputs.append(by_value(got))
                reference.append(by_value(want))
                errors.append(((got - want).abs().max() / want.abs().max()).item())
        compilations = int(counters["stats"]["unique_graphs"])

    if not post_grad.records:
        raise RuntimeError("the post-grad pass never ran (Inductor cache hit?)")
    first = post_grad.records[0]
    return {
        "outputs": outputs, "reference": reference, "max_rel_error": errors,
        "counts_before": first["counts_before"], "counts_after": first["counts_after"],
        "graph_before": first["graph_before"], "graph_after": first["graph_after"],
        "compilations": compilations, "post_grad_calls": len(post_grad.records),
        "sp_matched": first["sp_matched"], "token_counts": list(token_counts),
        "padded_counts": list(padded_counts), "tp_group": tp_group.unique_name,
        "decisions": decisions, "times_ms": times_ms,
        "extra_pass_report": getattr(extra_pass, "last_report", None),  # FlashCommPass's, of the last graph
    }


def _mean_ms(call, repeats):
    """Mean wall time of ``call`` over ``repeats`` calls, every rank starting together."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    dist.barrier()
    return (time.perf_counter() - start) / repeats * 1e3


def _compile_only(compiled, padded):
    """Run Inductor up to the post-grad pass, which records the graphs and stops the compile.

    The compiled graph never runs: its ops may need CUDA, and a rank that
    failed in one of them would leave the other waiting in a collective.
    """
    ids, positions = torch.zeros(padded, dtype=torch.long), torch.arange(padded)
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(positions, 0)
    try:
        compiled(ids, positions)
    except Exception as exc:  # Dynamo wraps the pass's exception
        if not _caused_by(exc, _GraphsRecorded):
            raise
    else:
        raise RuntimeError("compile-only run completed without reaching the post-grad pass")


def _caused_by(exc, kind) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _vllm_sp_pass(vllm_config):
    """vLLM's SequenceParallelismPass (vLLM <= 0.31 only), built directly (VLLM_CPU.md step 8)."""
    try:
        from vllm.compilation.passes.fusion.sequence_parallelism import SequenceParallelismPass
    except ImportError as exc:
        raise RuntimeError("this vLLM has no SequenceParallelismPass (removed in 0.32): use vllm_sp=False "
                           "and fcpass.PassConfig(sequence_parallel=True)") from exc
    return SequenceParallelismPass(vllm_config)


def _vllm_tail_passes(vllm_config):
    """What vLLM's PostGradPassManager runs after the user's pass: cleanup, IR lowering, clone elimination,
    cleanup, functionalization fix."""
    from vllm.compilation.passes.ir.clone_elimination import UnsafeCloneEliminationPass
    from vllm.compilation.passes.ir.lowering_pass import VllmIRLoweringPass
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass
    from vllm.compilation.passes.utility.post_cleanup import PostCleanupPass

    cleanup = PostCleanupPass(vllm_config)
    return [cleanup, VllmIRLoweringPass(vllm_config), UnsafeCloneEliminationPass(vllm_config), cleanup,
            FixFunctionalizationPass(vllm_config)]
