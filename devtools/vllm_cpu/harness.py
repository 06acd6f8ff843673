"""compile_and_run: the model at TP=N, compiled with (vLLM's SP or none) + a pass, against its eager self."""

from __future__ import annotations

import contextlib
import time

import torch

import fcpass
from devtools.launch import by_value
from devtools.vllm_cpu.graph_pass import GraphsRecorded, SPThenExtraPass, sp_pass_of, tail_passes_of
from devtools.vllm_cpu.model import DEFAULT_TOKEN_COUNTS, LAYERS, MODEL_KINDS, VOCAB, build_model
from devtools.vllm_cpu.tp import vllm_tp


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
        tail = tail_passes_of(vllm_config) if vllm_tail_passes else ()
        post_grad = SPThenExtraPass(sp_pass_of(vllm_config) if vllm_sp else None, extra_pass, tail,
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
        if not _caused_by(exc, GraphsRecorded):
            raise
    else:
        raise RuntimeError("compile-only run completed without reaching the post-grad pass")


def _caused_by(exc, kind) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _pad_to_multiple(n, multiple):
    return -(-n // multiple) * multiple
