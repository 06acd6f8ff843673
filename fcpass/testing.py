"""Test fcpass on your own model: load the graphs ``FCPASS_CAPTURE`` wrote where the model runs, run the pass on
them here, read what it did.

    from fcpass.testing import load_captures, replay

    def test_every_row_parallel_linear_is_fused():
        for capture in load_captures("tests/data/my_model"):
            result = replay(capture, config={"threshold_tokens": 0})
            assert result.problems == []
            assert result.ops_after.get("fcpass.mm_all_reduce_onednn.default", 0) == 2

No process group, no vLLM, vllm-ascend or torch_npu is needed: the pass reads
the facts its live run read (:mod:`passes.process`), and an op whose library
is not loaded is registered from its captured schema, its fake answered from
the fake values of its captured calls (no kernel: nothing here runs it).
A capture only replays on the torch (major.minor) that wrote it: the graph is
pickled with torch's own ``GraphPickler``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher

import fcpass  # noqa: F401 - registers torch.ops.fcpass.*
from fcpass.config import PassConfig
from passes import capture as capture_format
from passes import process
from passes.flashcomm import FlashCommPass


class CaptureError(ValueError):
    """A capture that cannot be loaded or replayed here; the message is one line saying why."""


@dataclasses.dataclass
class Capture:
    """One captured graph: its facts (``capture.json``) and, once loaded, the graph and its foreign ops' fakes."""

    folder: pathlib.Path
    facts: dict
    graph_module: fx.GraphModule
    fakes: dict

    @property
    def rank(self) -> int:
        return self.facts["rank"]

    @property
    def world_size(self) -> int:
        return self.facts["world_size"]

    @property
    def graph_number(self) -> int:
        """The graph's place among its process's captured graphs (ranks compile the same graphs in order)."""
        return int(self.folder.name.rsplit("-g", 1)[1])


@dataclasses.dataclass
class Replayed:
    """What the pass did to a capture here."""

    capture: Capture
    report: list[list[str]]  # [family, form, outcome] per site, as PassReport.rows()
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    table: str  # the why-not table
    problems: list[str]  # a rewritten graph that is not well formed, a report unlike the live run's

    def as_json(self) -> dict:
        return {"capture": self.capture.folder.name, "graph": self.capture.graph_number, "rank": self.capture.rank,
                "world_size": self.capture.world_size, "report": self.report,
                "ops_before": self.ops_before, "ops_after": self.ops_after, "problems": self.problems}


def capture_folders(root) -> list[pathlib.Path]:
    """Every capture folder under ``root`` (itself, or any folder below holding a graph file), sorted."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise CaptureError(f"{root}: not a folder")
    return sorted({path.parent for path in root.rglob(capture_format.GRAPH_FILE)})


def load_captures(root) -> list[Capture]:
    """Every capture under ``root``, loaded (:func:`load`)."""
    return [load(folder) for folder in capture_folders(root)]


def load(folder) -> Capture:
    """One capture folder, its ops registered where their library is absent; :class:`CaptureError` says why
    not (an unfinished or truncated capture, another torch, an op whose schema changed)."""
    folder = pathlib.Path(folder)
    facts = _read_facts(folder)
    _register_ops(facts["schemas"])
    if "npu" in facts.get("devices", ()):
        _name_the_npu_device()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    try:
        data = (folder / capture_format.GRAPH_FILE).read_bytes()
        loaded = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True))
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad capture, said in one line
        raise CaptureError(f"{folder}: {capture_format.GRAPH_FILE} cannot be loaded "
                           f"({type(exc).__name__}: {_one_line(exc)})") from None
    return Capture(folder, facts, loaded["graph_module"], loaded["fakes"])


def replay(capture: Capture, config: dict | PassConfig | None = None) -> Replayed:
    """Run the pass on a copy of the captured graph as the live compile did (its groups, sizes, compile range);
    ``config``: another config (a dict's fields replace the captured config's)."""
    live = config is None
    if isinstance(config, PassConfig):
        config = config.to_dict()
    try:
        pass_config = PassConfig.from_dict({**capture.facts["config"], **(config or {})})
    except ValueError as exc:
        raise CaptureError(f"config: {_one_line(exc)}") from None
    gm = fx.GraphModule(capture.graph_module, capture_format.copy_graph(capture.graph_module.graph))
    outputs_before = _output_values(gm.graph)
    flash_comm = FlashCommPass(pass_config)
    _RECORDED_FAKES.clear()
    _RECORDED_FAKES.update(capture.fakes)
    try:  # as Inductor runs its post-grad passes: symbolic sizes go through the Python meta functions
        with process.reading(process.RecordedProcess(capture.facts["process"])), enable_python_dispatcher():
            flash_comm(gm.graph)
    except process.MissingFact as exc:
        raise CaptureError(f"{capture.folder}: {exc}") from None
    report = flash_comm.last_report.rows()
    problems = _not_well_formed(gm, outputs_before)
    if live and report != capture.facts["report"]:
        problems.append("the replayed report differs from the live run's: "
                        f"{_first_difference(report, capture.facts['report'])}")
    return Replayed(capture, report, capture_format.op_counts(capture.graph_module.graph),
                    capture_format.op_counts(gm.graph), flash_comm.report(), problems)


def ranks_disagree(results: list[Replayed]) -> list[str]:
    """Where ranks of one compile (the same graph number and world size) got another report or other fused ops
    (other ops may differ: vLLM gives a row-parallel linear its bias on rank 0 only)."""
    groups: dict[tuple, list[Replayed]] = {}
    for result in results:
        groups.setdefault((result.capture.graph_number, result.capture.world_size), []).append(result)
    problems = []
    for (number, world_size), same in sorted(groups.items()):
        first = same[0]
        for other in same[1:]:
            if (other.report, _fused_ops(other)) != (first.report, _fused_ops(first)):
                problems.append(f"graph {number} (world size {world_size}): rank {other.capture.rank} differs from "
                                f"rank {first.capture.rank}")
    return problems


def _fused_ops(result: Replayed) -> dict[str, int]:
    return {op: n for op, n in result.ops_after.items() if op.startswith("fcpass.")}


# --------------------------------------------------------------------------- loading

def _read_facts(folder: pathlib.Path) -> dict:
    path = folder / capture_format.FACTS_FILE
    if not path.is_file():
        raise CaptureError(f"{folder}: no {capture_format.FACTS_FILE} (the capture did not finish)")
    try:
        facts = json.loads(path.read_text())
    except ValueError as exc:
        raise CaptureError(f"{folder}: {capture_format.FACTS_FILE} is not JSON (truncated?): {exc}") from None
    if facts.get("format") != capture_format.FORMAT:
        raise CaptureError(f"{folder}: capture format {facts.get('format')!r}, this fcpass reads "
                           f"{capture_format.FORMAT}")
    captured_torch = str(facts.get("versions", {}).get("torch"))
    if _major_minor(captured_torch) != _major_minor(torch.__version__):
        raise CaptureError(f"{folder}: captured with torch {captured_torch}, this is torch {torch.__version__}: "
                           "replay with the torch that captured it")
    return facts


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


_LIBRARIES: dict[str, torch.library.Library] = {}
_RECORDED_FAKES: dict[str, list] = {}  # op name -> (inputs, output) of its captured calls, the capture replayed


def _register_ops(schemas: dict[str, str]) -> None:
    """Each captured op: checked against this process's where it exists, else registered from its schema."""
    for name, schema in schemas.items():
        namespace, op_name, overload = name.split(".")
        existing = _lookup(namespace, op_name, overload)
        if existing is not None:
            if _definable(str(existing._schema)) != _definable(schema):
                raise CaptureError(f"op {name}: its schema here, {existing._schema}, is not the captured {schema}")
            continue
        library = _LIBRARIES.setdefault(namespace, torch.library.Library(namespace, "FRAGMENT"))
        try:
            library.define(_definable(schema.split("::", 1)[1]))
        except RuntimeError as exc:
            raise CaptureError(f"op {name}: its captured schema {schema} cannot be registered: {_one_line(exc)}")
        registered = _lookup(namespace, op_name, overload)
        torch.library.register_fake(f"{namespace}::{op_name}" + ("" if overload == "default" else f".{overload}"),
                                    _recorded_fake(name, returns=len(registered._schema.returns)), lib=library)


def _definable(schema: str) -> str:
    """A printed schema as ``define`` reads it: a printed alias set is numbered and shows what it becomes
    (``Tensor($0! -> )``), a definition names it (``Tensor(a!)``); an opaque Python object argument
    (``PyObject``, vLLM's layer names) is defined as ``Any``."""
    letters: dict[str, str] = {}

    def alias(match) -> str:
        return f"({letters.setdefault(match[1], chr(ord('a') + len(letters)))}{match[2]})"

    return re.sub(r"\((\$\d+)(!?)(?: -> [^)]*)?\)", alias, schema).replace("PyObject ", "Any ")


def _lookup(namespace: str, op_name: str, overload: str):
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError):
        return None


def _recorded_fake(name: str, returns: int):
    def fake(*args, **kwargs):
        if not returns:  # an op that only writes its inputs (functionalized around it): nothing to make
            return None
        calls = _RECORDED_FAKES.get(name, [])
        wanted = _signature((args, kwargs))
        for inputs, output in calls:
            if _signature(inputs) == wanted:
                return _fresh(output)
        like = _output_follows_input(calls)
        if like is not None:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            return _fresh(leaves[like])
        raise RuntimeError(f"replay: {name}'s library is not loaded, and the capture holds no call of it with "
                           f"these inputs ({wanted})")

    return fake


def _signature(values) -> str:
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"T{[str(s) for s in value.shape]}{value.dtype}{value.device.type}"
        return repr(value) if not isinstance(value, torch.SymInt) else str(value)

    return "|".join(one(v) for v in torch.utils._pytree.tree_leaves(values))


def _output_follows_input(calls) -> int | None:
    """The input leaf every captured call's (single tensor) output has the shape and dtype of, if one."""
    candidates = None
    for inputs, output in calls:
        if not isinstance(output, torch.Tensor):
            return None
        leaves = torch.utils._pytree.tree_leaves(inputs)
        same = {i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and _signature(v) == _signature(output)}
        candidates = same if candidates is None else candidates & same
    return min(candidates) if candidates else None


def _fresh(value):
    """A new fake value like ``value`` (in the fake mode of the graph replayed: the capture's)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    return value


def _name_the_npu_device() -> None:
    """Fake tensors on "npu" need the device name; torch_npu gives it, and here it is absent."""
    try:
        torch.device("npu")
    except RuntimeError:
        torch.utils.rename_privateuse1_backend("npu")


# --------------------------------------------------------------------------- checking

def _output_values(graph: fx.Graph) -> list:
    (output,) = graph.find_nodes(op="output")
    return [n.meta.get("val") if isinstance(n, fx.Node) else n
            for n in torch.utils._pytree.tree_leaves(output.args[0])]


def _not_well_formed(gm: fx.GraphModule, outputs_before: list) -> list[str]:
    """Fake propagation through the rewritten graph gives the original's outputs (shapes, dtypes, devices)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(placeholders))
    try:
        with enable_python_dispatcher():
            FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return [f"fake propagation through the rewritten graph fails: {type(exc).__name__}: {_one_line(exc)}"]
    after = _output_values(gm.graph)
    if len(after) != len(outputs_before):
        return [f"the rewritten graph has {len(after)} outputs, the original {len(outputs_before)}"]
    return [f"output {i}: {_describe(a)}, the original's {_describe(b)}"
            for i, (a, b) in enumerate(zip(after, outputs_before)) if _describe(a) != _describe(b)]


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(str(s) for s in value.shape)} {value.dtype} {value.device.type}"
    return str(value)


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"site {i}: {x} here, {y} live"
    return f"{len(a)} sites here, {len(b)} live"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
