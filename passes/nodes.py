"""Reading a post-grad graph's nodes: which op one calls, its arguments by name, its traced value.

The optional libraries (vLLM, vLLM's ``_C``, torch_npu) register their ops
only when loaded, so an op of theirs is looked up, never assumed.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fcpass.matmuls import SCALAR_TYPE_NUMBERS

aten = torch.ops.aten

AUTO_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)


def registered_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>.default``, or None where the library that registers it is not loaded
    (vLLM, vLLM's ``_C``, torch_npu: all optional)."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def functional_op(name: str):
    return getattr(torch.ops._c10d_functional, name).default


def vllm_op(name: str):
    """vLLM's custom op (collectives, linears), or None when vLLM is not imported."""
    return registered_op("vllm", name)


def npu_op(name: str):
    """torch_npu's op, or None where torch_npu is not loaded."""
    return registered_op("npu", name)


# torch_npu's ``int`` dtype arguments in a graph are c10 ScalarType numbers (npu_quant_matmul's output_dtype 15 is
# bfloat16, npu_quantize's dtype 12 qint8).
_SCALAR_TYPES = {number: dtype for dtype, number in SCALAR_TYPE_NUMBERS.items()}


def as_dtype(value) -> torch.dtype | None:
    """A dtype argument as a torch.dtype: itself, or the dtype of its c10 ScalarType number; None for None or an
    unknown number."""
    if value is None or isinstance(value, torch.dtype):
        return value
    return _SCALAR_TYPES.get(value) if isinstance(value, int) else None


def bound_args(node: fx.Node) -> dict:
    """The op's arguments by schema name, defaults filled in, however the call passed them."""
    schema_args = node.target._schema.arguments
    given = dict(zip((a.name for a in schema_args), node.args), **node.kwargs)
    return {a.name: given.get(a.name, a.default_value if a.has_default_value() else None) for a in schema_args}


def mutated_arg(functionalized: fx.Node, name: str) -> fx.Node:
    """The tensor an ``auto_functionalized`` (v1: by name) or ``auto_functionalized_v2`` (v2: a base) mutates."""
    kwargs = functionalized.kwargs
    return kwargs[name] if name in kwargs else kwargs["_all_bases"][kwargs[f"_{name}_base_index"]]


def fake_value(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def dim(node) -> int:
    val = fake_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else -1
