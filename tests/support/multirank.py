"""The tests' name for devtools.launch (ranks must import rank bodies by module name), and shared ranks.

Starting ranks costs more than most rank bodies (each rank imports torch,
many import vLLM: 5-12 s a spawn here), so the test modules register their
bodies with :func:`shared` when pytest imports them, and every body with the
same (world_size, backend, setup) runs in one set of ranks, the first time
any of them is asked for.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from dataclasses import dataclass, field

from devtools.launch import DEFAULT_TIMEOUT_S, run_ranks


@dataclass
class _Group:
    world_size: int
    backend: str
    setup: object
    cases: dict = field(default_factory=dict)  # id -> (fn, args)
    modules: dict = field(default_factory=dict)  # id -> (the test module that registered it, its timeout)
    outcome: object = None  # per-rank results, or the exception of the whole run

    def results(self, case_id) -> list:
        if self.outcome is None:
            cases = {i: case for i, case in self.cases.items() if _is_selected(self.modules[i][0])}
            timeout = sum(self.modules[i][1] for i in cases)
            try:
                self.outcome = run_ranks(_run_cases, self.world_size, cases, timeout=timeout,
                                         backend=self.backend, setup=self.setup)
            except Exception as exc:  # a hang or a dead rank: every body of the group fails with it
                self.outcome = exc
        if isinstance(self.outcome, Exception):
            names = ", ".join(_name(fn) for fn, _ in self.cases.values())
            raise RuntimeError(f"shared ranks ({names}) failed") from self.outcome
        per_rank = [results.get(case_id) for results in self.outcome]
        for rank, outcome in enumerate(per_rank):
            if outcome is None:
                raise RuntimeError(f"{_name(self.cases[case_id][0])} did not run: a body before it in the same "
                                   f"ranks failed (rank {rank})")
            if outcome[0] == "error":
                raise RuntimeError(f"rank {rank} failed:\n{outcome[1]}")
        return [payload for _, payload in per_rank]


_groups: dict[tuple, _Group] = {}
_ids = itertools.count()
_selected_modules: set[str] | None = None  # the modules of the tests this session runs (None: all)


def select_modules(modules) -> None:
    """Run only the bodies registered by these test modules (conftest passes the modules of the selected
    tests: ``-k`` and ``-m`` leave the other modules' bodies out of the shared ranks)."""
    global _selected_modules
    _selected_modules = set(modules)


def _is_selected(module: str) -> bool:
    return _selected_modules is None or module in _selected_modules


def shared(fn, *args, world_size: int = 2, backend: str = "gloo", setup=None, timeout: float = DEFAULT_TIMEOUT_S):
    """Register ``fn(rank, world_size, *args)`` for the shared ranks; returns a function giving its per-rank results.

    Call at module level (pytest imports every test module before running any
    test). Only the bodies of modules with a selected test run (see
    :func:`select_modules`). A body's failure fails only the tests that read
    it; the bodies after it in the same ranks do not run (a rank may be left
    mid-collective) and say so. The run's deadline is the sum of its bodies'
    timeouts.
    """
    group = _groups.setdefault((world_size, backend, setup), _Group(world_size, backend, setup))
    if group.outcome is not None:
        raise RuntimeError(f"shared({_name(fn)}) registered after its ranks ran: register at module level")
    case_id = next(_ids)
    group.cases[case_id] = (fn, args)
    group.modules[case_id] = (sys._getframe(1).f_globals["__name__"], timeout)
    return lambda: group.results(case_id)


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
