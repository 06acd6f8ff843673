"""The tests' name for devtools.launch (ranks must import rank bodies by module name), and shared ranks.

Starting ranks costs more than most rank bodies (each rank imports torch,
many import vLLM: 5-12 s a spawn here), so the test modules register their
bodies with :func:`shared` when pytest imports them, and every body with the
same (world_size, backend, setup) that a selected test reads runs in one set
of ranks, the first time any of them is asked for.
"""

from __future__ import annotations

import inspect
import itertools
import traceback
import types
from dataclasses import dataclass, field

from devtools.launch import DEFAULT_TIMEOUT_S, run_ranks


@dataclass
class _Group:
    world_size: int
    backend: str
    setup: object
    cases: dict = field(default_factory=dict)  # id -> (fn, args, timeout)
    outcomes: dict = field(default_factory=dict)  # id -> per-rank results, or the exception of its run
    started: bool = False

    def results(self, case_id) -> list:
        if case_id not in self.outcomes:
            self._run([i for i in self.cases if i not in self.outcomes and (i == case_id or _is_selected(i))])
        outcome = self.outcomes[case_id]
        if isinstance(outcome, Exception):
            raise RuntimeError(f"shared ranks ({_name(self.cases[case_id][0])} and the bodies run with it) "
                               "failed") from outcome
        for rank, result in enumerate(outcome):
            if result is None:
                raise RuntimeError(f"{_name(self.cases[case_id][0])} did not run: a body before it in the same "
                                   f"ranks failed (rank {rank})")
            if result[0] == "error":
                raise RuntimeError(f"rank {rank} failed:\n{result[1]}")
        return [payload for _, payload in outcome]

    def _run(self, case_ids) -> None:
        """One spawn for ``case_ids`` (the selected bodies not run yet); its deadline the sum of their timeouts."""
        self.started = True
        cases = {i: self.cases[i][:2] for i in case_ids}
        try:
            per_rank = run_ranks(_run_cases, self.world_size, cases, timeout=sum(self.cases[i][2] for i in cases),
                                 backend=self.backend, setup=self.setup)
        except Exception as exc:  # a hang or a dead rank: every body of the run fails with it
            self.outcomes.update((i, exc) for i in cases)
            return
        self.outcomes.update((i, [results.get(i) for results in per_rank]) for i in cases)


class SharedBody:
    """What :func:`shared` returns: call it for the body's per-rank results (its ranks start on the first call)."""

    def __init__(self, group: _Group, case_id: int) -> None:
        self.group, self.case_id = group, case_id

    def __call__(self) -> list:
        return self.group.results(self.case_id)


_groups: dict[tuple, _Group] = {}
_ids = itertools.count()
_selected_cases: set[int] | None = None  # the bodies the selected tests read (None: all)


def select_tests(items) -> None:
    """Run only the bodies the selected tests read (conftest passes pytest's selected items, so ``-k``, ``-m``
    and node ids select bodies too). A test reads a body when it, a fixture it uses, or a function of its
    module they call names the body's handle (or a dict or list of handles); a body read some other way still
    runs, in ranks of its own."""
    global _selected_cases
    functions = []
    for item in items:
        functions.append(getattr(item, "function", None))
        for definitions in getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}).values():
            functions += [getattr(definition, "func", None) for definition in definitions]
    _selected_cases = _bodies_named_by(f for f in functions if isinstance(f, types.FunctionType))


def _bodies_named_by(functions) -> set[int]:
    found, seen = set(), set()
    stack = [(inspect.unwrap(f).__code__, inspect.unwrap(f).__globals__) for f in functions]
    while stack:
        code, namespace = stack.pop()
        if code in seen:
            continue
        seen.add(code)
        stack += [(const, namespace) for const in code.co_consts if isinstance(const, types.CodeType)]
        for name in code.co_names:
            value = namespace.get(name)
            # a handle, or a table of them (parametrized tests index one: the whole table is read)
            found |= {body.case_id for body in _handles_in(value)}
            if isinstance(value, types.FunctionType) and value.__module__ == namespace.get("__name__"):
                stack.append((value.__code__, value.__globals__))
    return found


def _handles_in(value) -> list[SharedBody]:
    if isinstance(value, SharedBody):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [v for v in value if isinstance(v, SharedBody)] if isinstance(value, (list, tuple)) else []


def _is_selected(case_id: int) -> bool:
    return _selected_cases is None or case_id in _selected_cases


def shared(fn, *args, world_size: int = 2, backend: str = "gloo", setup=None,
           timeout: float = DEFAULT_TIMEOUT_S) -> SharedBody:
    """Register ``fn(rank, world_size, *args)`` for the shared ranks; returns the handle to its per-rank results.

    Call at module level (pytest imports every test module before running any
    test). Only the bodies the selected tests read run (see
    :func:`select_tests`). A body's failure fails only the tests that read
    it; the bodies after it in the same ranks do not run (a rank may be left
    mid-collective) and say so. A run's deadline is the sum of its bodies'
    timeouts.
    """
    group = _groups.setdefault((world_size, backend, setup), _Group(world_size, backend, setup))
    if group.started:
        raise RuntimeError(f"shared({_name(fn)}) registered after its ranks ran: register at module level")
    case_id = next(_ids)
    group.cases[case_id] = (fn, args, timeout)
    return SharedBody(group, case_id)


def _name(fn) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _run_cases(rank, world_size, cases):
    """In each rank: the bodies in registration order, each from a fresh compile cache, runtime config and counts."""
    import torch

    import fcpass

    results = {}
    for case_id, (fn, args) in cases.items():
        torch._dynamo.reset()
        fcpass.configure(fcpass.PassConfig())
        fcpass.reset_decision_counts()
        try:
            results[case_id] = ("ok", fn(rank, world_size, *args))
        except Exception:
            results[case_id] = ("error", traceback.format_exc())
            break
    return results
