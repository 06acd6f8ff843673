"""The post-grad pass the harness compiles with: vLLM's SP (if asked), the pass under test, vLLM's tail passes."""

from __future__ import annotations

import collections

from torch._inductor.custom_graph_pass import CustomGraphPass


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
            raise GraphsRecorded()
        for pass_ in self.tail:
            pass_(graph)

    def uuid(self):
        return None


class GraphsRecorded(Exception):
    """Raised by the pass to end a compile-only run before the compiled graph runs."""


def sp_pass_of(vllm_config):
    """vLLM's SequenceParallelismPass (vLLM <= 0.31 only), built directly (VLLM_CPU.md step 8)."""
    try:
        from vllm.compilation.passes.fusion.sequence_parallelism import SequenceParallelismPass
    except ImportError as exc:
        raise RuntimeError("this vLLM has no SequenceParallelismPass (removed in 0.32): use vllm_sp=False "
                           "and fcpass.PassConfig(sequence_parallel=True)") from exc
    return SequenceParallelismPass(vllm_config)


def tail_passes_of(vllm_config):
    """What vLLM's PostGradPassManager runs after the user's pass: cleanup, IR lowering, clone elimination,
    cleanup, functionalization fix."""
    from vllm.compilation.passes.ir.clone_elimination import UnsafeCloneEliminationPass
    from vllm.compilation.passes.ir.lowering_pass import VllmIRLoweringPass
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass
    from vllm.compilation.passes.utility.post_cleanup import PostCleanupPass

    cleanup = PostCleanupPass(vllm_config)
    return [cleanup, VllmIRLoweringPass(vllm_config), UnsafeCloneEliminationPass(vllm_config), cleanup,
            FixFunctionalizationPass(vllm_config)]
