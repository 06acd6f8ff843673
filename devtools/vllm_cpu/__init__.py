"""A real vLLM Llama at TP=N on CPU gloo ranks, compiled with (vLLM's SP or none) + a post-grad pass: the tests' harness.

Inside one rank of a 2-rank (or N-rank) gloo run started by
``devtools.launch.run_ranks(fn, world_size, ..., setup=rank_setup)``,
:func:`compile_and_run` builds a small vLLM Llama with random weights at
TP=world_size, compiles it with Inductor with vLLM's SequenceParallelismPass
(``vllm_sp=True``, vLLM <= 0.31) or none (the plain TP graph, for fcpass's
own SP) followed by an arbitrary extra post-grad pass, runs it, runs the
same model eagerly (plain TP, no compile) as the reference, and returns what
the extra pass saw (op counts and graph text before/after it) and the numbers.

Parts: ``tp`` (vLLM's config and TP group in a rank, with its CPU fixes),
``model`` and ``attention`` (the models), ``graph_pass`` (the post-grad pass
the harness compiles with), ``harness`` (compile_and_run).

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
- ``"llama_8_heads"``: "llama" with 8 attention and 8 KV heads, so TP=8
  splits it (devtools/captures.py: the TP=8 capture of the test data).

Attention: vLLM's ``Attention`` needs a KV cache and a forward context. The
test model replaces it (only while the model is built) with
``attention.CausalAttention``, which calls an opaque custom op
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

What it takes on CPU (docs/VLLM_CPU.md, steps 1-8), each done here:
1. custom-op collectives: ``rank_setup`` (pass it as run_ranks' ``setup``)
   switches them on before distributed init; ``compile_and_run`` re-applies
   it and checks the TP group really uses them;
2. vLLM's CPU ``vllm.all_reduce`` reduces in place and returns its input:
   ``_all_reduce_clone_fix`` reduces a clone (compiled and eager);
3. Inductor ``pre_grad_custom_pass`` = ``VllmIRInplaceFunctionalizationPass``;
4. compiled calls run inside ``pass_context(Range(1, max_tokens))``;
5. Inductor FX graph cache and the autograd cache off (config patches, plus
   the env that devtools.launch sets), and the combined pass has ``uuid() ->
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

from devtools.vllm_cpu.harness import compile_and_run
from devtools.vllm_cpu.model import LAYERS, MODEL_KINDS
from devtools.vllm_cpu.tp import rank_setup, vllm_tp
from fcpass.checks.vllm_group import agree_on_dist_ident

__all__ = ["LAYERS", "MODEL_KINDS", "agree_on_dist_ident", "compile_and_run", "rank_setup", "vllm_tp"]
