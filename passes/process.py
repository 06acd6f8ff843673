"""What the rewrite reads of the process that compiles the graph: the one seam a capture records and a replay
answers.

The pass decides from the graph and from a few facts of its process: a named
group's size, vLLM's tensor-parallel group (vllm-ascend's collectives name
none), which vLLM group owns a CPU shared-memory handle, and the compile range
vLLM is compiling. Every read goes through :func:`current`, so a capture
(``FCPASS_CAPTURE``) can write down each answer the live run got, and a replay
(``python -m fcpass.replay``) can give the same answers in a process with no
process group and no vLLM.
"""

from __future__ import annotations

import contextlib
import threading

import torch.distributed as dist

from fcpass.groups import resolve_group
from fcpass.vllm import state as vllm_state


class MissingFact(LookupError):
    """A replayed pass asked what its capture did not record (the live pass never asked it)."""


class LiveProcess:
    """The process itself: torch.distributed's and vLLM's state."""

    def group_size(self, group_name: str) -> int | None:
        """The size of the group behind ``group_name``; None where no group has that name here."""
        group = self._group(group_name)
        return group.size() if group is not None else None

    @staticmethod
    def _group(group_name: str):
        try:
            return resolve_group(group_name)
        except ValueError:
            return None

    def tp_group(self) -> tuple[str, int] | None:
        """(unique name, world size) of vLLM's tensor-parallel group, if this process has one."""
        return vllm_state.tp_group()

    def shm_group_name(self, handle: int) -> str | None:
        """The c10d name of the group whose vLLM shared-memory communicator owns ``handle``."""
        return vllm_state.shm_group_name(handle)

    def compile_range_start(self) -> int | None:
        """The smallest token count of the graph vLLM is compiling now, None outside vLLM's backend."""
        return vllm_state.compile_range_start()


class RecordingProcess(LiveProcess):
    """The live process, with every answer written down (a capture's ``process`` facts)."""

    def __init__(self) -> None:
        self.groups: dict[str, int | None] = {}
        self.group_ranks: dict[str, list[int]] = {}  # for the reader: the global ranks of each group
        self.shm_groups: dict[str, str | None] = {}
        self.asked: dict[str, object] = {}

    def group_size(self, group_name):
        group = self._group(group_name)
        self.groups[group_name] = group.size() if group is not None else None
        if group is not None:
            self.group_ranks[group_name] = dist.get_process_group_ranks(group)
        return self.groups[group_name]

    def tp_group(self):
        tp = super().tp_group()
        self.asked["tp_group"] = list(tp) if tp is not None else None
        return tp

    def shm_group_name(self, handle):
        name = self.shm_groups[str(handle)] = super().shm_group_name(handle)
        return name

    def compile_range_start(self):
        start = self.asked["compile_range_start"] = super().compile_range_start()
        return start

    def facts(self) -> dict:
        return {"groups": self.groups, "group_ranks": self.group_ranks, "shm_groups": self.shm_groups, **self.asked}


class RecordedProcess:
    """A capture's answers, given back; a question it holds no answer to raises :class:`MissingFact`."""

    def __init__(self, facts: dict) -> None:
        self._facts = facts

    def _get(self, table: str, key: str):
        known = self._facts.get(table, {}) if table else self._facts
        if key not in known:
            raise MissingFact(f"the capture does not record {table + ' ' if table else ''}{key!r}")
        return known[key]

    def group_size(self, group_name):
        return self._get("groups", group_name)

    def tp_group(self):
        tp = self._get("", "tp_group")
        return tuple(tp) if tp is not None else None

    def shm_group_name(self, handle):
        return self._get("shm_groups", str(handle))

    def compile_range_start(self):
        return self._get("", "compile_range_start")


_LIVE = LiveProcess()
_current = threading.local()


def current():
    """The process the rewrite reads now: the live one, or what :func:`reading` put in its place."""
    return getattr(_current, "process", _LIVE)


@contextlib.contextmanager
def reading(process):
    """Let the rewrite read ``process`` (a recording or a recorded one) in this thread until the block ends."""
    previous = current()
    _current.process = process
    try:
        yield process
    finally:
        _current.process = previous
