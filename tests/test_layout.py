"""The import arrows point one way: runtime <- rewrite <- vLLM integration <- tooling; the wheel is the library.

Read from the source (ast), so an arrow added the wrong way fails here
before it can make an import cycle or a hard dependency:
- the runtime (``fcpass`` less ``fcpass.vllm`` and the user tools: ``fcpass.testing`` and ``fcpass.replay`` on
  top of the rewrite, ``fcpass.calibrate`` with its ``measure`` and ``cli``, ``fcpass.compare`` with its
  ``engine_run``, the hardware checks ``fcpass.checks``) never imports the rewrite
  (``passes``) or the integration, save ``fcpass.vllm.state`` (vLLM's private
  state, a leaf), and imports vLLM, vllm-ascend or torch_npu only inside
  functions (their optional entry points);
- the rewrite imports the runtime (and that leaf) only;
- nothing installed imports the tooling (devtools, examples, benchmarks), and nothing of the library imports the
  user tools;
- module-level imports form no cycle;
- ``import fcpass`` loads neither vLLM, torch_npu nor the rewrite;
- the wheel ``pip install .`` installs holds the library's packages only, and the plugin entry point.
"""

import ast
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ("fcpass", "passes")
TOOLING = ("devtools", "examples", "benchmarks")
STATE = "fcpass.vllm.state"
OPTIONAL = ("vllm", "vllm_ascend", "torch_npu")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in LIBRARY + TOOLING:
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


def _under_any(name: str, packages) -> bool:
    return any(_is_under(name, package) for package in packages)


MODULES = _modules()
MODULE_NAMES = set(MODULES)
INTEGRATION = {m for m in MODULES if _is_under(m, "fcpass.vllm") and m != STATE}
# installed, on top of the rewrite, the integration and the runtime: capture replay, measuring a threshold table,
# the engine without and with fcpass, the hardware checks
USER_TOOLS = {"fcpass.testing", "fcpass.replay", "fcpass.calibrate", "fcpass.measure", "fcpass.cli", "fcpass.compare",
              "fcpass.engine_run", *(m for m in MODULES if _is_under(m, "fcpass.checks"))}
RUNTIME = {m for m in MODULES if _is_under(m, "fcpass") and m not in INTEGRATION | USER_TOOLS}
REWRITE = {m for m in MODULES if _is_under(m, "passes")}


def _wrong_imports(modules, forbidden) -> list[tuple[str, str]]:
    """(module, import) for every import of ``modules`` that ``forbidden(name, at_module_level)`` refuses."""
    return [(m, name) for m in sorted(modules) for name, top in _imports(MODULES[m]) if forbidden(name, top)]


def _optional_at_top(name: str, top: bool) -> bool:
    return top and _under_any(name, OPTIONAL)


def test_the_layout_has_the_layers_this_test_checks():
    assert STATE in RUNTIME and "fcpass.vllm.compilation" in INTEGRATION and "passes.flashcomm" in REWRITE
    assert {m.split(".")[0] for m in MODULES} == set(LIBRARY + TOOLING)


def test_the_runtime_never_imports_the_rewrite_or_the_integration_and_optional_libraries_only_lazily():
    assert _wrong_imports(RUNTIME, lambda name, top: _is_under(name, "passes") or name in INTEGRATION
                          or _optional_at_top(name, top)) == []


def test_vllm_private_state_is_a_leaf():
    assert _wrong_imports({STATE}, lambda name, top: _under_any(name, LIBRARY) or _optional_at_top(name, top)) == []


def test_the_rewrite_imports_only_the_runtime():
    assert _wrong_imports(REWRITE, lambda name, top: name in INTEGRATION or _under_any(name, TOOLING)
                          or _optional_at_top(name, top)) == []


def test_nothing_installed_imports_the_tooling():
    assert _wrong_imports(RUNTIME | INTEGRATION | REWRITE | USER_TOOLS, lambda name, top: _under_any(name, TOOLING)) == []


def test_the_library_never_imports_the_user_tools():
    assert USER_TOOLS <= set(MODULES)
    assert _wrong_imports(RUNTIME | INTEGRATION | REWRITE, lambda name, top: name in USER_TOOLS) == []


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


def test_the_wheel_holds_the_library_only(tmp_path):
    """What ``pip install .`` installs (tests/support/wheel.py builds it as pip does)."""
    from support import wheel as wheels

    wheel = wheels.build(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    packages = {pathlib.PurePath(n).parent.as_posix().replace("/", ".") for n in names if n.endswith(".py")}
    assert packages == {m for m in MODULES if _under_any(m, LIBRARY) and MODULES[m].name == "__init__.py"}
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "fcpass = fcpass.vllm.plugin:register" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_import_fcpass_loads_no_optional_library_and_not_the_rewrite():
    probe = ("import sys, fcpass; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('vllm', 'vllm_ascend', 'torch_npu', 'passes')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_import_fcpass_loads_of_the_vllm_integration_only_the_state_leaf():
    """Read from the modules a fresh process has loaded, not from import statements: a package's
    ``__init__`` runs whatever it imports (``fcpass.vllm``'s used to load its compilation module)."""
    probe = "import sys, fcpass; print(sorted(m for m in sys.modules if m.startswith('fcpass.vllm')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(["fcpass.vllm", STATE])
