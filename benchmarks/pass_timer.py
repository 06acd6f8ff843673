"""Time graph passes on fresh copies of one captured post-grad graph, inside the compile that produced it.

Rank side of benchmarks/pass_cost.py. :class:`PassTimer` is the harness's
extra post-grad pass (devtools.vllm_cpu.compile_and_run with
``run_compiled=False``): it gets vLLM Llama's plain TP graph (``aten.mm ->
vllm.all_reduce``), derives the SP graph from it once with vLLM's
SequenceParallelismPass, and times every variant on a fresh deep copy of its
source graph, variants interleaved, every repeat. It runs where Inductor runs
post-grad passes (same fake mode, shape env and vLLM pass context), so the
passes see what they see in a real compile; the compile then stops.
"""

from __future__ import annotations

import collections
import copy
import gc
import logging
import statistics
import time

import torch.fx as fx

logger = logging.getLogger(__name__)

# variant: (source graph, passes run in order). "plain" = the TP graph the harness compiles; "sp" = that graph
# after vLLM 0.31's SequenceParallelismPass (what vLLM's AsyncTPPass is built for).
VARIANTS = {
    "vllm_async_tp": ("sp", ("async_tp",)),
    "fcpass_fusion": ("sp", ("fcpass_fusion",)),
    "vllm_sp": ("plain", ("vllm_sp",)),
    "fcpass_sp": ("plain", ("fcpass_sp",)),
    "vllm_sp+async_tp": ("plain", ("vllm_sp", "async_tp")),
    "fcpass_sp+fusion": ("plain", ("fcpass_sp_fusion",)),
}

# What a variant leaves in the graph: collectives, fused ops, matmuls (op target -> short name).
COUNTED_OPS = {
    "vllm.all_reduce.default": "all_reduce",
    "vllm.reduce_scatter.default": "reduce_scatter",
    "vllm.all_gather.default": "all_gather",
    "symm_mem.fused_matmul_reduce_scatter.default": "fused_mm_rs",
    "symm_mem.fused_all_gather_matmul.default": "fused_ag_mm",
    "fcpass.mm_reduce_scatter.default": "fused_mm_rs",
    "fcpass.all_gather_mm.default": "fused_ag_mm",
    "aten.mm.default": "mm",
}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def require_vllm_sp_passes() -> None:
    """Exit with what to do where this vLLM lacks the passes the comparison runs (vLLM >= 0.32 removed them)."""
    import importlib.util

    for module in ("sequence_parallelism", "collective_fusion"):
        if importlib.util.find_spec(f"vllm.compilation.passes.fusion.{module}") is None:
            raise SystemExit(f"pass_cost compares fcpass with vLLM's SequenceParallelismPass and AsyncTPPass, which "
                             f"this vLLM does not have (no vllm.compilation.passes.fusion.{module}; vLLM >= 0.32 "
                             "removed them): run it with vLLM 0.31 (the .venv of `make venv`)")


def _build_passes() -> tuple[dict, dict[str, float]]:
    """Every pass a variant uses (inside vLLM's config and TP context), and what constructing each cost (ms).

    Constructed once and reused, as vLLM's pass manager does: AsyncTPPass and
    SequenceParallelismPass trace their patterns in the constructor.
    """
    from vllm.compilation.passes.fusion.collective_fusion import AsyncTPPass
    from vllm.compilation.passes.fusion.sequence_parallelism import SequenceParallelismPass
    from vllm.config import get_current_vllm_config

    import fcpass
    from passes import FlashCommPass

    vllm_config = get_current_vllm_config()
    # sequence_parallel_threshold_tokens=0: the split applies at any compile range (the harness's is tiny).
    factories = {
        "async_tp": lambda: AsyncTPPass(vllm_config),
        "vllm_sp": lambda: SequenceParallelismPass(vllm_config),
        "fcpass_fusion": lambda: FlashCommPass(fcpass.PassConfig()),
        "fcpass_sp": lambda: FlashCommPass(fcpass.PassConfig(
            sequence_parallel=True, sequence_parallel_threshold_tokens=0,
            fuse_mm_reduce_scatter=False, fuse_all_gather_mm=False)),
        "fcpass_sp_fusion": lambda: FlashCommPass(fcpass.PassConfig(
            sequence_parallel=True, sequence_parallel_threshold_tokens=0)),
    }
    passes, construct_ms = {}, {}
    for name, factory in factories.items():
        start = time.perf_counter()
        passes[name] = factory()
        construct_ms[name] = (time.perf_counter() - start) * 1e3
    return passes, construct_ms


def fresh_copy(graph: fx.Graph) -> fx.Graph:
    """A deep copy of ``graph`` with its own GraphModule (pattern passes read ``graph.owning_module``).

    Node meta is copied shallowly (Graph.__deepcopy__): the fake values are
    shared, which the passes only read.
    """
    return fx.GraphModule(graph.owning_module, copy.deepcopy(graph)).graph


def op_summary(graph: fx.Graph) -> dict[str, int]:
    """Counts of COUNTED_OPS (by short name) and of all nodes."""
    counts = collections.Counter()
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in COUNTED_OPS:
            counts[COUNTED_OPS[str(node.target)]] += 1
    counts["nodes"] = len(graph.nodes)
    return dict(counts)


class PassTimer:
    """The harness's extra pass: times VARIANTS on copies of the graph it is given; results in ``last_report``.

    ``last_report`` (the attribute the harness hands back from the rank):
    {"construct_ms": {pass: ms}, "source": {"plain": op_summary, "sp": ...},
    "variants": {name: {"times_ms": [...], "median_ms", "after": op_summary}}}.
    """

    def __init__(self, repeats: int, variants=tuple(VARIANTS)):
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown pass variant(s) {unknown}; known: {sorted(VARIANTS)}")
        self.repeats, self.variants = repeats, tuple(variants)
        self.passes, self.construct_ms = _build_passes()
        self.last_report = None

    def __call__(self, graph: fx.Graph) -> None:
        sources = {"plain": fresh_copy(graph)}
        sources["sp"] = fresh_copy(sources["plain"])
        self.passes["vllm_sp"](sources["sp"])  # untimed: the SP graph is an input here
        times = {name: [] for name in self.variants}
        after = {}
        for repeat in range(self.repeats):
            # rotate the order each repeat, so no variant always runs first (or right after a copy)
            order = self.variants[repeat % len(self.variants):] + self.variants[:repeat % len(self.variants)]
            for name in order:
                ms, summary = self._run_once(name, sources)
                times[name].append(ms)
                if after.setdefault(name, summary) != summary:
                    raise RuntimeError(f"{name} rewrote differently on repeat {repeat}: {after[name]} vs {summary}")
            logger.info("rank %d, repeat %d/%d: %s", _rank(), repeat + 1, self.repeats,
                        ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in self.variants))
        self.last_report = {
            "construct_ms": self.construct_ms,
            "source": {name: op_summary(g) for name, g in sources.items()},
            "variants": {name: {"times_ms": times[name], "median_ms": statistics.median(times[name]),
                                "after": after[name]} for name in self.variants},
        }

    def _run_once(self, name: str, sources: dict) -> tuple[float, dict]:
        source, pass_names = VARIANTS[name]
        graph = fresh_copy(sources[source])
        gc.collect()  # every timed call starts from the same heap state; gc stays on, as in a real compile
        start = time.perf_counter()
        for pass_name in pass_names:
            self.passes[pass_name](graph)
        ms = (time.perf_counter() - start) * 1e3
        return ms, op_summary(graph)


def time_passes(rank: int, world_size: int, layers: int, repeats: int, tokens: int, variants=tuple(VARIANTS)) -> dict:
    """Rank entry point: capture vLLM Llama's plain TP graph with ``layers`` layers and time ``variants`` on it."""
    import functools

    from devtools.vllm_cpu import compile_and_run

    r = compile_and_run(rank, world_size, "llama", (tokens,), vllm_sp=False, run_compiled=False, layers=layers,
                        extra_pass_factory=functools.partial(PassTimer, repeats, variants))
    if r["extra_pass_report"] is None:
        raise RuntimeError("the pass timer never ran")
    return r["extra_pass_report"]
