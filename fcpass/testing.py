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
the fake values of its captured calls (:mod:`fcpass.foreign_ops`; no kernel:
nothing here runs it).
A capture only replays on the torch (major.minor) that wrote it: the graph is
pickled with torch's own ``GraphPickler``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher

import fcpass  # noqa: F401 - registers torch.ops.fcpass.*
from fcpass import foreign_ops
from fcpass.foreign_ops import one_line
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
    notes: list[str] = dataclasses.field(default_factory=list)  # output sizes the original's fakes traced otherwise
    rewritten: fx.GraphModule | None = None  # the graph after the pass (fcpass.numerics runs its fused sites)

    def as_json(self) -> dict:
        return {"capture": self.capture.folder.name, "graph": self.capture.graph_number, "rank": self.capture.rank,
                "world_size": self.capture.world_size, "report": self.report,
                "ops_before": self.ops_before, "ops_after": self.ops_after, "problems": self.problems,
                "notes": self.notes}


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
    try:
        foreign_ops.register(facts["schemas"])
    except foreign_ops.SchemaError as exc:
        raise CaptureError(str(exc)) from None
    if "npu" in facts.get("devices", ()):
        foreign_ops.name_the_npu_device()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    try:
        data = (folder / capture_format.GRAPH_FILE).read_bytes()
        loaded = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True))
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad capture, said in one line
        raise CaptureError(f"{folder}: {capture_format.GRAPH_FILE} cannot be loaded "
                           f"({type(exc).__name__}: {one_line(exc)})") from None
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
        raise CaptureError(f"config: {one_line(exc)}") from None
    gm = fx.GraphModule(capture.graph_module, capture_format.copy_graph(capture.graph_module.graph))
    outputs_before = capture_format.output_values(gm.graph)
    flash_comm = FlashCommPass(pass_config)
    problems, notes = [], []
    with foreign_ops.replaying(capture.fakes):
        try:  # as Inductor runs its post-grad passes: symbolic sizes go through the Python meta functions
            with process.reading(process.RecordedProcess(capture.facts["process"])), enable_python_dispatcher():
                flash_comm(gm.graph)
        except process.MissingFact as exc:
            raise CaptureError(f"{capture.folder}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the finding, in one line (a live compile would have failed)
            problems.append(f"the pass fails on this graph: {type(exc).__name__}: {one_line(exc)}")
        if not problems:
            problems, notes = _check_outputs(gm, outputs_before)
    report = flash_comm.last_report.rows()
    ops_after = capture_format.op_counts(gm.graph)
    if live and report != capture.facts["report"]:
        problems.append("the replayed report differs from the live run's: "
                        f"{_first_difference(report, capture.facts['report'])}")
    if live and ops_after != capture.facts["ops_after"]:
        problems.append("the replayed graph's ops differ from the live rewrite's: "
                        f"{_counts_difference(ops_after, capture.facts['ops_after'])}")
    return Replayed(capture, report, capture_format.op_counts(capture.graph_module.graph), ops_after,
                    flash_comm.report(), problems, notes, gm)


def ranks_disagree(results: list[Replayed]) -> list[str]:
    """Where ranks of one compile (the same graph number and world size) decided otherwise: other outcomes per
    family, or other fused ops (forms and other ops may differ: vLLM gives a row-parallel linear its bias on
    rank 0 only, an addmm there and an mm elsewhere)."""
    groups: dict[tuple, list[Replayed]] = {}
    for result in results:
        groups.setdefault((result.capture.graph_number, result.capture.world_size), []).append(result)
    problems = []
    for (number, world_size), same in sorted(groups.items()):
        first = same[0]
        for other in same[1:]:
            if _decisions(other) != _decisions(first):
                problems.append(f"graph {number} (world size {world_size}): rank {other.capture.rank} differs from "
                                f"rank {first.capture.rank}")
    return problems


def _decisions(result: Replayed) -> tuple:
    outcomes = [(family, outcome) for family, _, outcome in result.report]
    return outcomes, {op: n for op, n in result.ops_after.items() if op.startswith("fcpass.")}


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


# --------------------------------------------------------------------------- checking

def _check_outputs(gm: fx.GraphModule, outputs_before: list) -> tuple[list, list]:
    """(problems, notes) of the rewritten graph's outputs, from fake propagation through it: it must run and
    keep the original's dtypes, devices and ranks; a size other than the original's is a note (the original's
    op fakes may trace it otherwise, see :func:`_same_size`)."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(placeholders))
    try:
        with enable_python_dispatcher():
            FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return [f"fake propagation through the rewritten graph fails: {type(exc).__name__}: {one_line(exc)}"], []
    after = capture_format.output_values(gm.graph)
    if len(after) != len(outputs_before):
        return [f"the rewritten graph has {len(after)} outputs, the original {len(outputs_before)}"], []
    problems, notes = [], []
    for i, (a, b) in enumerate(zip(after, outputs_before)):
        text = f"output {i}: {capture_format.describe(a)}, the original's {capture_format.describe(b)}"
        if not _same_kind(a, b):
            problems.append(text)
        elif isinstance(a, torch.Tensor) and not all(_same_size(x, y) for x, y in zip(a.shape, b.shape)):
            notes.append(text)
    return problems, notes


def _same_kind(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return capture_format.describe(a) == capture_format.describe(b)
    return (a.dtype, a.device.type, a.dim()) == (b.dtype, b.device.type, b.dim())


def _same_size(x, y) -> bool:
    """Provably equal sizes. Not always so where the original traced a size through an op's own fake that
    loses padding: vllm-ascend's FlashComm reduce traces an odd token count's shard as ``s // 2`` rows, where
    it returns (and fcpass's op traces) ``(s + 1) // 2``."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(x == y))


def _counts_difference(got: dict, want: dict) -> str:
    return ", ".join(f"{op} {got.get(op, 0)} here, {want.get(op, 0)} live"
                     for op in sorted({*got, *want}) if got.get(op, 0) != want.get(op, 0))


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"site {i}: {x} here, {y} live"
    return f"{len(a)} sites here, {len(b)} live"
