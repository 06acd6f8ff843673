"""The import arrows point one way: runtime <- rewrite <- vLLM integration; optional libraries stay optional.

Read from the source (ast), so an arrow added the wrong way fails here
before it can make an import cycle or a hard dependency:
- the runtime (``fcpass`` less its vLLM integration and its tooling) never
  imports the rewrite (``passes``), and imports vLLM, vllm-ascend or
  torch_npu only inside functions (their optional entry points);
- the rewrite imports the runtime only, never the integration or tooling;
- module-level imports between fcpass and passes modules form no cycle;
- ``import fcpass`` loads neither vLLM, torch_npu nor the rewrite.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
INTEGRATION = {"fcpass.vllm", "fcpass.vllm_plugin"}
# Harness, launcher, demos and engine runner: installed today, not the runtime (issue 19 moves them out).
TOOLING = {"fcpass.launch", "fcpass.engine", "fcpass.demo", "fcpass.ops_demo", "fcpass.vllm_cpu_llama"}
OPTIONAL = ("vllm", "vllm_ascend", "torch_npu")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in ("fcpass", "passes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from package import module`` imports the module; ``from module import name`` the module
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [m for m in submodules if m in MODULE_NAMES] or [node.module]
            found += [(name, id(node) in top_level) for name in names]
    return found


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = _modules()
MODULE_NAMES = set(MODULES)
RUNTIME = {m for m in MODULES if _is_under(m, "fcpass") and m not in INTEGRATION | TOOLING}


def test_the_runtime_never_imports_the_rewrite_and_optional_libraries_only_lazily():
    wrong = [(m, name) for m in sorted(RUNTIME) for name, top in _imports(MODULES[m])
             if _is_under(name, "passes") or (top and any(_is_under(name, lib) for lib in OPTIONAL))]
    assert wrong == []


def test_the_rewrite_imports_only_the_runtime():
    wrong = [(m, name) for m in sorted(MODULES) if _is_under(m, "passes") for name, top in _imports(MODULES[m])
             if any(_is_under(name, other) for other in INTEGRATION | TOOLING)
             or (top and any(_is_under(name, lib) for lib in OPTIONAL))]
    assert wrong == []


def test_module_level_imports_form_no_cycle():
    graph = {m: {name for name, top in _imports(MODULES[m]) if top and name in MODULES and name != m} for m in MODULES}
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_import_fcpass_loads_no_optional_library_and_not_the_rewrite():
    probe = ("import sys, fcpass; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('vllm', 'vllm_ascend', 'torch_npu', 'passes')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
