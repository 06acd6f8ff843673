"""The site a fused op replaced: its own collective op, which the op's unfused path runs.

Below its threshold a fused op must do exactly what the graph did, so that
small batches cost nothing: not an all_reduce of fcpass's own over the
ProcessGroup behind the name, but the graph's ``vllm.all_reduce(x, group)``,
which vLLM routes through its device communicator (custom all-reduce,
symmetric memory or pynccl on NVIDIA, vllm-ascend's communicator on Ascend,
the shared-memory kernel on AVX-512 CPUs), and which is what vLLM captures
into CUDA graphs. The rewrite writes the site into the op's ``site``
argument, so the compiled graph carries it (a cached graph runs as compiled):

    "<collective form>[:<handle>]/<matmul form>[,<matmul form>...]"

e.g. ``"vllm/addmm"``, ``"c10d_functional/mm"``, ``"shm:0/onednn_mm"``,
``"vllm_ascend/npu_quant_matmul"``, an all_gather feeding two matmuls
``"vllm/mm,mm"``. The matmul forms are read by :class:`fcpass.matmuls.Matmul`,
which calls the site's own matmul op. An empty site (an eager call) is the
functional collectives and fcpass's matmul semantics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fcpass.comm import as_sendable
from fcpass.matmuls import MATMUL_FORMS
from fcpass.validate import FusedOpInputError

C10D_FUNCTIONAL = "c10d_functional"  # torch's functional collectives + wait_tensor
VLLM = "vllm"  # vLLM's collective custom ops (its GroupCoordinator, its device communicator)
VLLM_ASCEND = "vllm_ascend"  # vllm-ascend's FlashComm v1 ops, switched per forward by vllm-ascend
SHM = "shm"  # vLLM's CPU shared-memory all_reduce, _C.shm_allreduce(handle, data), in place
COLLECTIVE_FORMS = (C10D_FUNCTIONAL, VLLM, VLLM_ASCEND, SHM)


class Site(NamedTuple):
    collective: str
    handle: int | None  # shm: the communicator's handle, as the graph passed it
    matmuls: tuple[str, ...]  # one form per matmul; () for an eager call

    def matmul(self, index: int) -> str:
        """The form of the ``index``-th matmul ("" where the site names none: fcpass's semantics)."""
        return self.matmuls[index] if self.matmuls else ""


EAGER = Site(C10D_FUNCTIONAL, None, ())


def site_text(collective: str, matmul_forms, handle: int | None = None) -> str:
    """The ``site`` argument the rewrite gives a fused op (see the module docstring)."""
    head = collective if handle is None else f"{collective}:{handle}"
    return f"{head}/{','.join(matmul_forms)}"


@functools.lru_cache(maxsize=512)
def parse(op: str, text: str) -> Site:
    """The site of a fused op's ``site`` argument; a clear error for one the runtime does not know."""
    if not text:
        return EAGER
    head, slash, forms = text.partition("/")
    collective, colon, handle = head.partition(":")
    matmuls = tuple(forms.split(",")) if forms else ()
    problem = (
        "no '/' between collective and matmul forms" if not slash
        else f"unknown collective form {collective!r} (known: {', '.join(COLLECTIVE_FORMS)})"
        if collective not in COLLECTIVE_FORMS
        else "a shm site needs its handle ('shm:<handle>')" if (collective == SHM) != bool(colon)
        else f"handle {handle!r} is not an int" if colon and not handle.lstrip("-").isdigit()
        else next((f"unknown matmul form {form!r} (known: {', '.join(MATMUL_FORMS)})"
                   for form in matmuls if form not in MATMUL_FORMS), None)
    )
    if problem:
        raise FusedOpInputError(f"fcpass::{op}: site {text!r}: {problem}")
    return Site(collective, int(handle) if colon else None, matmuls)


def _functional():
    return torch.ops._c10d_functional


def reduce_scatter(site: Site, rows: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """The site's sum reduce_scatter of ``rows`` along dim 0 (vllm-ascend's pads and decides itself)."""
    if site.collective == VLLM:
        return torch.ops.vllm.reduce_scatter(rows, 0, world_size, group_name)
    if site.collective == VLLM_ASCEND:
        return torch.ops.vllm.maybe_pad_and_reduce(rows)
    functional = _functional()
    return functional.wait_tensor(functional.reduce_scatter_tensor(rows, "sum", world_size, group_name))


def all_gather(site: Site, rows: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """The site's all_gather of ``rows`` along dim 0 (vllm-ascend's: as it decides in this forward, unpadded)."""
    if site.collective == VLLM:
        return torch.ops.vllm.all_gather(rows, 0, world_size, group_name)
    if site.collective == VLLM_ASCEND:
        return torch.ops.vllm.maybe_all_gather_and_maybe_unpad(rows, True)
    functional = _functional()
    moved = as_sendable(rows.contiguous())  # no fp8 on gloo; bytes are exact
    return functional.wait_tensor(functional.all_gather_into_tensor(moved, world_size, group_name)).view(rows.dtype)


def all_reduce(site: Site, rows: torch.Tensor, group_name: str) -> torch.Tensor:
    """The site's sum all_reduce of ``rows`` (a new tensor, or ``rows`` reduced in place for shm)."""
    if site.collective == VLLM:
        return torch.ops.vllm.all_reduce(rows, group_name)
    if site.collective == SHM:
        torch.ops._C.shm_allreduce(site.handle, rows)
        return rows
    functional = _functional()  # in place on the fresh product, as Inductor lowers the graph's functional op
    functional.all_reduce_(rows, "sum", group_name)
    return functional.wait_tensor(rows)
