"""The torch_npu stand-in has torch-npu 2.10.0.post4's own op schemas, read from the wheel's op yaml.

fcpass reads torch_npu ops in graphs by their schema's argument names and calls the fused kernels by
keyword, so a stand-in whose schema differs from the real one would test forms that never occur. The
yaml (``npu_native_functions_by_codegen.yaml``) is unpacked from the wheel by ``devtools.sources``
(`make test` does it; torch_npu itself is never installed). Registered ops (``torch.ops.npu.*``) must carry
the yaml's schema exactly; the Python-level kernels fcpass calls must take the yaml's arguments, in its
order, keyword-only where it has ``*``, with its defaults (torch's Python bindings name ``self`` ``input``).
"""

import importlib.util
import ast
import inspect
import os
import re

import pytest
import torch

from devtools import sources
from support.npu_runs import STANDIN_DIR

REGISTERED = ("npu_quantize", "npu_quant_matmul")
PYTHON_KERNELS = ("npu_mm_reduce_scatter_base", "npu_all_gather_base_mm", "npu_mm_all_reduce_base",
                  "npu_trans_quant_param")


@pytest.fixture(scope="module")
def wheel_schemas() -> dict:
    path = sources.TORCH_NPU.path(sources.TORCH_NPU_SCHEMAS)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `make ascend-src` (python -m devtools.sources)")
    schemas = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*-?\s*func:\s*((\w+)\(.*)$", line)
        if match:
            schemas.setdefault(match.group(2), match.group(1))
    return schemas


@pytest.fixture(scope="module")
def standin():
    """The stand-in loaded under another name: this process gains no `torch_npu` module."""
    spec = importlib.util.spec_from_file_location("torch_npu_schema_check",
                                                  os.path.join(STANDIN_DIR, "torch_npu", "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_ops_carry_the_wheels_schema(wheel_schemas, standin, name):
    real = torch._C.parse_schema(wheel_schemas[name])
    assert str(torch._C.parse_schema(standin.SCHEMAS[name])) == str(real)
    assert str(getattr(torch.ops.npu, name).default._schema) == f"npu::{real}"


def _python_default(argument):
    if not argument.has_default_value():
        return inspect.Parameter.empty
    return argument.default_value


@pytest.mark.parametrize("name", PYTHON_KERNELS)
def test_the_kernels_fcpass_calls_take_the_wheels_arguments(wheel_schemas, standin, name):
    real = torch._C.parse_schema(wheel_schemas[name])
    params = list(inspect.signature(getattr(standin, name)).parameters.values())
    expected = [("input" if a.name == "self" else a.name, a.kwarg_only, _python_default(a)) for a in real.arguments]
    got = [(p.name, p.kind is inspect.Parameter.KEYWORD_ONLY, p.default) for p in params]
    assert got == expected


def _signatures(path) -> dict[str, str]:
    """{name: its parameters as written} of a module's top-level functions and of its classes' methods
    ("Class.method"), read from the source."""
    found = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = ast.unparse(node.args)
        elif isinstance(node, ast.ClassDef):
            found[node.name] = "class"
            found.update({f"{node.name}.{item.name}": ast.unparse(item.args) for item in node.body
                          if isinstance(item, ast.FunctionDef)})
    return found


def test_the_standins_torch_npu_is_torch_npu_210s_own_api():
    """``torch.npu`` as the stand-in gives it vllm-ascend 0.23 (streams, events, devices): every name it
    defines, with its parameters, is torch-npu 2.10.0.post4's (vllm-ascend 0.23.0.post1's pin), read from the
    wheel's source; nothing the real module lacks."""
    real = {}
    for member in sources.TORCH_NPU_DEVICE_MODULE:
        path = sources.TORCH_NPU.path(member)
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: run `make ascend-src` (python -m devtools.sources)")
        real.update(_signatures(path))
    standin = _signatures(os.path.join(STANDIN_DIR, "torch_npu", "npu.py"))
    assert {"Stream", "Event", "current_stream", "current_device"} <= set(standin)
    assert {name: real.get(name) for name in standin} == standin
