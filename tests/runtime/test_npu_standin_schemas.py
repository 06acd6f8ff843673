"""The torch_npu stand-in is torch-npu 2.10.0.post4's own API, read from the wheel (vllm-ascend 0.23 and
0.30's pin): nothing it defines is missing from the real package, and each thing has the real signature.

fcpass reads torch_npu ops in graphs by their schema's argument names and calls the fused kernels by
keyword, so a stand-in whose schema differs from the real one would test forms that never occur. The
wheel's files are unpacked by ``devtools.sources`` (`make test` does it; torch_npu itself is never
installed): its op yaml (``npu_native_functions_by_codegen.yaml``), its package ``__init__``, the Python that
reads its dtypes and torchair's table of their numbers, and ``torch_npu/npu/``. Registered ops
(``torch.ops.npu.*``) must carry the yaml's schema exactly; the Python-level kernels fcpass calls must take the
yaml's arguments, in its order, keyword-only where it has ``*``, with its defaults (torch's Python bindings
name ``self`` ``input``).
"""

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


def _wheel_file(member: str):
    path = sources.TORCH_NPU.path(member)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `make ascend-src` (python -m devtools.sources)")
    return path


@pytest.fixture(scope="module")
def wheel_schemas() -> dict:
    schemas = {}
    for line in _wheel_file(sources.TORCH_NPU_SCHEMAS).read_text().splitlines():
        match = re.match(r"\s*-?\s*func:\s*((\w+)\(.*)$", line)
        if match:
            schemas.setdefault(match.group(2), match.group(1))
    return schemas


@pytest.fixture(scope="module")
def standin():
    """The stand-in's emulation (tests/standins/npu_kernels.py): this process gains no `torch_npu` module."""
    from standins import npu_kernels

    return npu_kernels


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


def test_the_standins_torch_npu_npu_is_torch_npu_210s_own_api():
    """``torch.npu`` as the stand-in gives it vllm-ascend (streams, events, devices): every name it
    defines, with its parameters, is torch-npu 2.10.0.post4's (vllm-ascend 0.23.0.post1's pin), read from the
    wheel's source; nothing the real module lacks."""
    real = {}
    for member in sources.TORCH_NPU_DEVICE_MODULE:
        real.update(_signatures(_wheel_file(member)))
    standin = _signatures(os.path.join(STANDIN_DIR, "torch_npu", "npu.py"))
    assert {"Stream", "Event", "current_stream", "current_device"} <= set(standin)
    assert {name: real.get(name) for name in standin} == standin


def _assigned_names(tree) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names |= {t.id for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.ImportFrom, ast.Import)):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
    return names


def _real_torch_npu_names(wheel_schemas) -> set[str]:
    """What the real ``torch_npu`` module has: its ops (exported as module attributes from torch.ops.npu), its
    ``__all__``, its submodule ``npu``, and every ``torch_npu.<name>`` its own Python reads (its dtypes)."""
    package = ast.parse(_wheel_file(sources.TORCH_NPU_PACKAGE).read_text())
    exported = next(ast.literal_eval(node.value) for node in package.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    read = set(re.findall(r"\btorch_npu\.(\w+)", _wheel_file(sources.TORCH_NPU_META).read_text()))
    return set(wheel_schemas) | set(exported) | read | {"npu"}


def test_the_standins_torch_npu_defines_only_what_the_real_package_has(wheel_schemas):
    """Every public name the stand-in package defines (read from its source, not imported) is one of the real
    package's; its dtypes carry the numbers torchair maps to their GE types."""
    tree = ast.parse(open(os.path.join(STANDIN_DIR, "torch_npu", "__init__.py")).read())
    defined = {name for name in _assigned_names(tree) if not name.startswith("_")} - {"torch"}
    assert {"npu_mm_reduce_scatter_base", "npu_quant_matmul", "npu", "hifloat8"} <= defined
    assert sorted(defined - _real_torch_npu_names(wheel_schemas)) == []
    ge_types = _wheel_file(sources.TORCH_NPU_GE_TYPES).read_text()
    ge_type_of_number = {int(n): t for n, t in re.findall(r"if dtype_value == (\d+):\s*\n\s*return m\.(DT_\w+)",
                                                         ge_types)}
    numbers = {target.id: value.value for node in tree.body if isinstance(node, ast.Assign)
               and isinstance(node.value, ast.Tuple)
               for target, value in zip(node.targets[0].elts, node.value.elts) if isinstance(value, ast.Constant)}
    assert {name: ge_type_of_number.get(number) for name, number in numbers.items()} == {
        "hifloat8": "DT_HIFLOAT8", "float8_e8m0fnu": "DT_FLOAT8_E8M0", "float4_e2m1fn_x2": "DT_FLOAT4_E2M1",
        "float4_e1m2fn_x2": "DT_FLOAT4_E1M2"}
