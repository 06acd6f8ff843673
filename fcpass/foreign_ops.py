"""The ops of libraries a replaying process lacks (vLLM's, vllm-ascend's, torch_npu's), stood in for from a
capture: each defined from its captured schema, without a kernel, its fake answered from the fake values of its
captured calls; the collectives the pass itself emits get the fakes of what they compute.

A capture's fakes are made active (:func:`replaying`) while its graph is replayed: every capture was unpickled
into its own fake mode, and a fake must answer in the graph's.
"""

from __future__ import annotations

import contextlib
import re

import torch


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 300 characters (what a replay says of a failure)."""
    return " ".join(str(exc).split())[:300]


class SchemaError(ValueError):
    """A captured op that cannot be stood in for here; the message is one line."""


_LIBRARIES: dict[str, torch.library.Library] = {}
_RECORDED_FAKES: dict[str, list] = {}  # op name -> (inputs, output) of its captured calls, the capture replayed


def register(schemas: dict[str, str]) -> None:
    """Each captured op: checked against this process's where it exists, else registered from its schema."""
    for name, schema in schemas.items():
        namespace, op_name, overload = name.split(".")
        existing = _lookup(namespace, op_name, overload)
        if existing is not None:
            if _definable(str(existing._schema)) != _definable(schema):
                raise SchemaError(f"op {name}: its schema here, {existing._schema}, is not the captured {schema}")
            continue
        library = _LIBRARIES.setdefault(namespace, torch.library.Library(namespace, "FRAGMENT"))
        try:
            library.define(_definable(schema.split("::", 1)[1]))
        except RuntimeError as exc:
            raise SchemaError(f"op {name}: its captured schema {schema} cannot be registered: {one_line(exc)}") \
                from None
        registered = _lookup(namespace, op_name, overload)
        fake = _EMITTED_FAKES.get(name) or _recorded_fake(name, returns=len(registered._schema.returns))
        torch.library.register_fake(f"{namespace}::{op_name}" + ("" if overload == "default" else f".{overload}"),
                                    fake, lib=library)


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


# The fakes of the collectives the pass emits (it knows what they compute): a graph need not have called them.
def _resized(tensor, dim: int, size):
    shape = list(tensor.shape)
    shape[dim] = size(shape[dim])
    return tensor.new_empty(shape)


_EMITTED_FAKES = {
    "vllm.all_reduce.default": lambda tensor, group_name: torch.empty_like(tensor),
    "vllm.reduce_scatter.default": lambda tensor, dim, world_size, group_name: _resized(
        tensor, dim, lambda rows: rows // world_size),
    "vllm.all_gather.default": lambda tensor, dim, world_size, group_name: _resized(
        tensor, dim, lambda rows: rows * world_size),
}


def _recorded_fake(name: str, returns: int):
    def fake(*args, **kwargs):
        if not returns:  # an op that only writes its inputs (functionalized around it): nothing to make
            return None
        calls = _RECORDED_FAKES.get(name, [])
        wanted = _signature((args, kwargs))
        for inputs, output in calls:
            if _signature(inputs) == wanted:
                return _fresh(output)
        follows = _outputs_follow_inputs(calls)
        if follows is not None:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            outs = [leaves[index].new_empty(leaves[index].shape, dtype=dtype) for index, dtype in follows]
            return outs[0] if not isinstance(calls[0][1], (tuple, list)) else type(calls[0][1])(outs)
        raise RuntimeError(f"replay: {name}'s library is not loaded, and the capture holds no call of it with "
                           f"these inputs ({wanted})")

    return fake


def _signature(values) -> str:
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"T{[str(s) for s in value.shape]}{value.dtype}{value.device.type}"
        return repr(value) if not isinstance(value, torch.SymInt) else str(value)

    return "|".join(one(v) for v in torch.utils._pytree.tree_leaves(values))


def _outputs_follow_inputs(calls) -> list[tuple[int, torch.dtype]] | None:
    """Per output tensor, (input leaf, dtype) where every captured call's output had that input's shape and
    that dtype (row-wise ops: vllm-ascend's quantize, vLLM's norms), so a call on other rows is answered alike;
    None where the captured calls show no such rule."""
    rules = None
    for inputs, output in calls:
        outputs = list(output) if isinstance(output, (tuple, list)) else [output]
        if not outputs or not all(isinstance(o, torch.Tensor) for o in outputs):
            return None
        leaves = torch.utils._pytree.tree_leaves(inputs)
        shapes = [[str(s) for s in v.shape] if isinstance(v, torch.Tensor) else None for v in leaves]
        seen = [({i for i, shape in enumerate(shapes) if shape == [str(s) for s in o.shape]}, {o.dtype})
                for o in outputs]
        rules = seen if rules is None else [(a & b, da | db) for (a, da), (b, db) in zip(rules, seen, strict=True)]
    if not rules or any(not inputs or len(dtypes) != 1 for inputs, dtypes in rules):
        return None
    return [(min(inputs), next(iter(dtypes))) for inputs, dtypes in rules]


def _fresh(value):
    """A new fake value like ``value`` (in the fake mode of the graph replayed: the capture's)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    return value


def name_the_npu_device() -> None:
    """Fake tensors on "npu" need the device name; torch_npu gives it, and here it is absent."""
    try:
        torch.device("npu")
    except RuntimeError:
        torch.utils.rename_privateuse1_backend("npu")


@contextlib.contextmanager
def replaying(fakes: dict):
    """The captured calls ``fakes`` ({op name: [(inputs, output)]}) answer the stand-ins' fakes in this block."""
    _RECORDED_FAKES.clear()
    _RECORDED_FAKES.update(fakes)
    try:
        yield
    finally:
        _RECORDED_FAKES.clear()
