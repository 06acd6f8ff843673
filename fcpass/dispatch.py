"""What a fused op does when called: plan a call signature once (validation, the guard's decision, the backend),
then run the fused path or the site's own ops.

A call's validation and guard decision depend only on its signature (shapes,
dtypes, device, scalar arguments, the config text, the site), so they run on
a signature's first call and later calls look the plan up: on the unfused
path (decode) the op's Python is a few microseconds.

``threshold_tokens`` left at ``CONFIG_THRESHOLD`` (as the rewrite leaves it) means
"the config's": its threshold_tokens, else its threshold table's bucket, else the
backend's default.

The config of a call is its ``config`` text (``PassConfig.runtime_text()``,
which the pass puts into every op it emits, so a cached graph runs as
compiled in every process); an empty text (an eager call) means this
process's :func:`configure`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from fcpass import guard, sites, validate
from fcpass.backends import select_backend
from fcpass.backends.base import MM_ALL_REDUCE, MM_REDUCE_SCATTER, Backend, FusedCall
from fcpass.config import PassConfig
from fcpass.families import FAMILIES
from fcpass.groups import resolve_group
from fcpass.matmuls import OneDNNMatmul, SumOfProducts, tensor_signature
from fcpass.vllm import state

logger = logging.getLogger(__name__)
_eager_config = PassConfig()

# The fused ops' threshold_tokens default: the call's config decides (a compiled graph's ops never pass one).
CONFIG_THRESHOLD = -1


def configure(config: PassConfig) -> None:
    """Set the config of eager calls (ops called without a ``config`` text); equal on every rank.

    Compiled graphs never read it: FlashCommPass gives every op it emits its own config.
    """
    global _eager_config
    if not isinstance(config, PassConfig):
        raise TypeError(f"configure() takes a fcpass.PassConfig, got {type(config).__name__}")
    _eager_config = config
    _plans.clear()  # the eager calls' plans were made under the config it replaces


def eager_config() -> PassConfig:
    """The config of eager calls, those with an empty ``config`` text (see :func:`configure`); a compiled graph's
    ops carry their own."""
    return _eager_config


def _config_of(op: str, text: str) -> PassConfig:
    if not text:
        return _eager_config
    try:
        return PassConfig.from_runtime_text(text)
    except ValueError as exc:
        raise validate.FusedOpInputError(f"fcpass::{op}: config argument: {exc}") from None


class Plan(NamedTuple):
    """What validation and the guard concluded for one call signature: the path and how to run it."""

    facts: guard.GuardFacts
    decision: guard.Decision
    backend: Backend | None
    pipeline_chunks: int  # fused path: the config's, else the table's; 0: the backend's choice
    options: object  # the backend's own options (Backend.options), as its reserve left them


# Call signature -> Plan. Validation and the guard read only the inputs' shapes, dtypes and device, the
# scalar arguments and the config (its text is part of the key; configure() clears the eager calls'), and a
# model repeats a handful of signatures on every forward step: each is planned once and looked up
# afterwards. Bounded.
# A backend's state of the group (CUDA: symmetric memory enabled, its workspace) is read when planning, so it is
# set before the first call, as vLLM sets it at startup.
_plans: dict[tuple, Plan] = {}
MAX_PLANS = 4096


def plan(op: str, family: str, call: FusedCall, threshold_tokens: int, config: PassConfig) -> Plan:
    """The guard's decision for a validated call, with the backend and chunk count its path runs with."""
    x, device, mms = call.x, call.x.device, call.matmuls
    rows, k = x.shape
    if isinstance(mms[0], SumOfProducts):
        k = sum(inputs.shape[1] for inputs in mms[0].inputs(x))
    num_tokens = FAMILIES[family].num_tokens(rows, call.world_size, call.pad_rows)
    facts = guard.GuardFacts(
        op=op, num_tokens=num_tokens, world_size=call.world_size, dtype=x.dtype,
        k=k, n=mms[0].n if len(mms) == 1 else sum(mm.n for mm in mms), device_type=device.type,
    )
    backend: Backend | None = select_backend(config.backend, device)
    if backend is not None:
        call = call._replace(options=backend.options(config))  # its limits may read them
    off_reason = (
        guard.BACKEND_OFF if backend is None
        else guard.FAMILY_DISABLED if not getattr(config, FAMILIES[family].config_flag)
        else _onednn_off_reason(call, backend) or backend.unsupported(family, call)
    )
    limits = None if off_reason else backend.limits(family, call)
    threshold = _resolve_threshold(threshold_tokens, config, backend, family, facts)
    decision = guard.decide(facts, threshold, limits, config.max_world_size, off_reason)
    chunks = _table_chunks(config, backend, family, facts) if decision.fused else 0
    options = backend.reserve(family, call) if decision.fused else call.options
    return Plan(facts, decision, backend, chunks, options)


def run(op: str, family: str, x: torch.Tensor, mms: tuple, row_scale: torch.Tensor | None, group_name: str,
         world_size: int | None, threshold_tokens: int, pad_rows: int, config: str, site: sites.Site):
    """An op's body: validate and plan on a signature's first call, then record the decision and run its path.

    ``world_size`` None: the group's (mm_all_reduce takes none, no shape depending on it).

    ``site``: the ops the graph had (:mod:`fcpass.sites`); the unfused path runs them. A vllm-ascend FlashComm
    v1 site is switched per forward by vllm-ascend (a rank-equal choice from the token count): the fused path
    is planned as that collective runs in this forward (:func:`_as_flash_comm_runs`: with FlashComm off a
    matmul -> all_reduce site, and a gather that keeps the local rows, which is vllm-ascend's own op).
    """
    traced_family = family
    if site.collective == sites.VLLM_ASCEND:
        family, world_size, pad_rows, local = _as_flash_comm_runs(family, world_size, pad_rows)
        if local:
            return FAMILIES[traced_family].unfused(site, x, mms, row_scale, world_size, group_name, pad_rows)
    group = None
    if world_size is None:
        group = resolve_group(group_name)  # by name on every call: a name can outlive its group
        world_size = group.size()
    key = (op, family, x.shape, x.dtype, x.device, tensor_signature(row_scale), group_name, world_size,
           threshold_tokens, pad_rows, config, site, *[mm.signature() for mm in mms])
    planned = _plans.get(key)
    if planned is None:
        FAMILIES[family].check(op, x, mms, row_scale, world_size, pad_rows)
    if group is None:
        group = resolve_group(group_name)
    if group.size() != world_size:
        raise validate.FusedOpInputError(
            f"fcpass::{op}: world_size {world_size} does not match group {group_name!r} of size {group.size()}"
        )
    call = FusedCall(x=x, matmuls=mms, group=group, group_name=group_name, world_size=world_size,
                     row_scale=row_scale, pad_rows=pad_rows)
    if planned is None:
        planned = plan(op, family, call, threshold_tokens, _config_of(op, config))
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = planned
        if config and config not in _announced:
            _announce(op, config)
    guard.record(planned.facts, planned.decision)
    if not planned.decision.fused:
        return FAMILIES[traced_family].unfused(site, x, mms, row_scale, world_size, group_name, pad_rows)
    if planned.pipeline_chunks or planned.options is not None:
        call = call._replace(pipeline_chunks=planned.pipeline_chunks, options=planned.options)
    return FAMILIES[family].fused(planned.backend, call)


# The config texts of the compiled graphs this process has run fused ops of (each said once).
_announced: set[str] = set()


def _announce(op: str, config: str) -> None:
    """Once per process and config: a graph with fcpass's ops runs here. The one line that says so where the pass
    itself said nothing: a graph served from a compile cache, whose pass never ran in this process."""
    _announced.add(config)
    logger.info("fcpass: this process runs a compiled graph with fcpass's fused ops (first: %s), config %s; "
                "decisions: fcpass.decision_counts()", op, config)


def _as_flash_comm_runs(family: str, world_size: int | None, pad_rows: int):
    """(family, world_size, pad_rows, gather skipped) of a site that replaced a vllm-ascend FlashComm
    collective, as that collective runs in this forward: off, the scatter all-reduces and the gather keeps the
    local rows; on, the scatter pads by vllm-ascend's ``pad_size`` (under DP: up to the largest count across
    DP ranks, more than the graph's ``(-m) % world_size``)."""
    flash_comm = state.ascend_flash_comm()
    if flash_comm is None:  # vllm-ascend not loaded: the traced form
        return family, world_size, pad_rows, False
    enabled, pad_size = flash_comm
    if not enabled:
        return (MM_ALL_REDUCE, None, 0, False) if family == MM_REDUCE_SCATTER else (family, world_size, 0, True)
    return family, world_size, pad_size if family == MM_REDUCE_SCATTER else pad_rows, False


def never_fused(family: str, device: torch.device, config: PassConfig) -> str | None:
    """Why every call of ``family`` on ``device`` tensors would take the unfused path under ``config``: its
    backend's default threshold is never passed, and neither the config's ``threshold_tokens`` nor its table
    gives another; None where some call may fuse. Read by the rewrite (the device is in the graph, equal on
    every rank), which then leaves the site as it was."""
    backend = select_backend(config.backend, device)
    if backend is None or config.threshold_tokens is not None or not getattr(config, FAMILIES[family].config_flag):
        return None
    table = config.table()
    if table is not None and table.backend == backend.name and any(key[0] == family for key in table.entries):
        return None
    return backend.never_pays(family, device.type)


def _onednn_off_reason(call: FusedCall, backend: Backend) -> str | None:
    mm = call.matmuls[0]
    if not isinstance(mm, OneDNNMatmul) and not (
            isinstance(mm, SumOfProducts) and isinstance(mm.products[0], OneDNNMatmul)):
        return None
    if backend.name != "generic":
        return guard.ONEDNN_GENERIC_ONLY
    return guard.PADDED_ONEDNN if call.pad_rows else None


def _resolve_threshold(
    threshold_tokens: int, config: PassConfig, backend: Backend | None, family: str, facts: guard.GuardFacts,
) -> int:
    """The first set of: the op's own threshold (>= 0), the config's, the table's bucket, the backend's default.

    Every input is rank-equal (the table is looked up by world_size, dtype, k, n), so the threshold is too.
    """
    if threshold_tokens >= 0:
        return threshold_tokens
    if config.threshold_tokens is not None:
        return config.threshold_tokens
    if backend is None:
        return 0
    entry = _table_entry(config, backend, family, facts)
    return entry.threshold_tokens if entry is not None else backend.default_threshold(family, facts)


def _table_chunks(config: PassConfig, backend: Backend, family: str, facts: guard.GuardFacts) -> int:
    """The config's chunk count, else the table's measured one for the bucket, else 0 (the backend's choice)."""
    if config.pipeline_chunks:
        return config.pipeline_chunks
    entry = _table_entry(config, backend, family, facts)
    return 0 if entry is None or entry.pipeline_chunks is None else entry.pipeline_chunks


def _table_entry(config: PassConfig, backend: Backend, family: str, facts: guard.GuardFacts):
    table = config.table()
    if table is None:
        return None
    return table.lookup(backend.name, family, facts.world_size, facts.dtype, facts.k, facts.n)
