"""FlashCommPass: sequence parallelism, then the fusion families, as one Inductor post-grad custom pass.

Picklable and deep-copyable (it holds only its config); ``uuid()`` hashes the
config and the source of every pass module, so Inductor's cache key changes
when either does.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

import fcpass  # registers torch.ops.fcpass.*
from fcpass.config import PassConfig
from passes import all_gather_mm, capture, mm_all_reduce, mm_reduce_scatter, process, sequence_parallel
from passes.fusion import fuse
from passes.report import PassReport

# Under "fcpass" like the runtime's loggers, so logging.getLogger("fcpass") reaches the rewrite too.
logger = logging.getLogger(f"fcpass.{__name__}")

# Set to a folder to get each graph before and after the pass written there (after: with its report).
DEBUG_DUMP_ENV = "FCPASS_DUMP_GRAPHS"
_PASS_SOURCES = sorted(Path(__file__).parent.glob("*.py"))

# Family order: sequence parallelism first (it creates the reduce_scatters and
# all_gathers the others fuse), then reduce_scatter, so an all_gather whose input
# comes from a rewritten reduce_scatter sees the final graph; matmul -> all_reduce last,
# on the all_reduces the split left. Each family reads its flag and threshold from the
# config; the fused ops get the config itself as text.
_FUSIONS = (mm_reduce_scatter.FUSION, all_gather_mm.FUSION, mm_all_reduce.FUSION)

# The reports of this process's last graphs, for callers that cannot reach the pass instance (vLLM workers
# hold copies of it; devtools/engine.py reads them with collective_rpc).
_RECENT_REPORTS: collections.deque = collections.deque(maxlen=16)


class FlashCommPass(CustomGraphPass):
    """Sequence parallelism (all_reduce -> norm split), then fusion of mm -> reduce_scatter,
    all_gather -> mm(s) and mm -> all_reduce into fcpass ops.

    A plain Inductor ``CustomGraphPass``; vLLM's pass managers take only their own
    pass types, so vLLM gets ``fcpass.vllm.VllmFlashCommPass`` (this pass as a
    ``VllmInductorPass``), which ``fcpass.vllm.compilation_config`` installs.
    """

    def __init__(self, config: PassConfig | None = None) -> None:
        self.config = config or PassConfig()
        self.last_report = PassReport()
        self._calls = 0

    @property
    def matched(self) -> dict[str, dict[str, int]]:
        """Fused sites per family and form, from the last call."""
        return self.last_report.matched()

    def report(self) -> str:
        """Why-not-fused table of the last graph: every collective seen, fused or the reason it was left alone."""
        return self.last_report.table()

    def __call__(self, graph: fx.Graph | fx.GraphModule) -> None:
        """Rewrite ``graph`` in place. Inductor's post-grad passes get an ``fx.Graph``; vllm-ascend's
        GraphFusionPassManager (aot_autograd's compiler in its ``fusion_pass_compile``, no Inductor after it)
        hands each pass the ``fx.GraphModule``, whose code is then regenerated here."""
        if isinstance(graph, fx.GraphModule):
            self._rewrite(graph.graph)
            graph.recompile()
        else:
            self._rewrite(graph)

    def _rewrite(self, graph: fx.Graph) -> None:
        start = time.perf_counter()
        self.last_report = PassReport()
        self._calls += 1
        self._dump(graph, "before")
        # No process state is written here: a compile-cache hit skips this pass, so what the fused ops read at
        # run time (backend, limits, chunks, threshold table) is an argument of each op (config.runtime_text()).
        captured = capture.start(graph, self.config)  # FCPASS_CAPTURE: the graph as handed over
        with process.reading(captured.process if captured else process.current()):
            sequence_parallel.rewrite(graph, self.config, self.last_report)
            for fusion in _FUSIONS:
                fuse(fusion, graph, self.config, self.last_report)
        _RECENT_REPORTS.append(self.last_report)
        stable_topological_sort(graph)
        graph.lint()
        self._dump(graph, "after")
        capture.finish(captured, graph, self.last_report)
        logger.info("FlashCommPass on graph %d of this process (%.1f ms): %s", self._calls,
                    (time.perf_counter() - start) * 1e3, self.last_report.summary())
        logger.debug("FlashCommPass report of graph %d:\n%s", self._calls, self.report())

    def uuid(self) -> str:
        digest = hashlib.sha256(self.config.key().encode())
        for path in _PASS_SOURCES:
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def __reduce__(self):
        # Rebuilt from the config alone, as the same class (vLLM's flavour stays vLLM's in its workers).
        return (type(self), (self.config,))

    def _dump(self, graph: fx.Graph, stage: str) -> None:
        folder = os.environ.get(DEBUG_DUMP_ENV)
        if not folder:
            return
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"flashcomm_{os.getpid()}_{self._calls:03d}_{stage}.txt")
        with open(path, "w") as f:
            f.write(str(graph))
            if stage == "after":
                f.write("\n# FlashCommPass report\n" + self.report() + "\n")
        if stage == "after":  # the same report, machine-readable (tests read it back from server workers)
            with open(path.replace("_after.txt", "_report.json"), "w") as f:
                json.dump(self.last_report.rows(), f)


def recent_reports() -> list[PassReport]:
    """The reports of the last graphs FlashCommPass rewrote in this process, oldest first."""
    return list(_RECENT_REPORTS)
