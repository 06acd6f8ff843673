"""The fused custom ops ``torch.ops.fcpass.*`` and the one body they share (validate, plan, run).

Each op is opaque to Inductor (a custom op with a fake impl that reads input
shapes only) and carries the guard inside, so a compiled graph holds the op
for every token count and never recompiles over the fused/unfused choice:

    mm_reduce_scatter(x, w, bias, group_name, world_size, threshold_tokens, pad_rows=0, config="")
        = reduce_scatter(pad(x @ w + bias, pad_rows zero rows), dim 0, SUM)
                                                   ((m + pad_rows)/ws, n)
    all_gather_mm(x, ws, biases, group_name, world_size, threshold_tokens, config="")
        = g = all_gather(x, dim 0); (g, [g @ w_i + b_i])
    mm_all_reduce(x, w, bias, group_name, threshold_tokens, config="")
        = all_reduce(x @ w + bias, SUM)               (m, n)
        (no world_size: no shape depends on it, so the graph needs no group
        at compile time; the op reads the group's size when called)
    mm_reduce_scatter_scaled / all_gather_scaled_mm / mm_all_reduce_scaled: the same over
        W8A8 (int8, per-channel dequant scale, int32 quant bias) and fp8
        (``_scaled_mm``) matmuls, with an output dtype.
    mm_reduce_scatter_onednn / all_gather_onednn_mm / mm_all_reduce_onednn: the same over vLLM's
        CPU oneDNN matmul, whose weight exists only inside its handler:
        (x, handler, n, bias, ...) in place of (x, w, bias, ...).

``site`` (the last argument of every op): the collective and matmul ops the
graph had at the site (:mod:`fcpass.sites`), which the unfused path runs, so
that below the threshold the op does exactly what the graph did; "" (an eager
call) is the functional collectives and aten's matmuls. A vllm-ascend
FlashComm v1 site is switched per forward by vllm-ascend; see :func:`_run`.

``threshold_tokens < 0`` means "the config's": its threshold_tokens, else
its threshold table's bucket, else the backend's default.

The config is an argument of every op, ``config``: a
``PassConfig.runtime_text()``, which FlashCommPass puts into every op it
emits, so the compiled graph carries it (a compile-cache hit runs the ops
with the config they were compiled with, in every process and on every
rank). An empty ``config`` (an eager call) means this process's
:func:`configure`.

A call's validation and guard decision depend only on its signature (shapes,
dtypes, device, scalar arguments, the config text), so they run on a
signature's first call and later calls look the plan up: on the unfused
path (decode) the op's Python is a few microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fcpass import guard, oplib, sites, validate
from fcpass.backends import select_backend
from fcpass.backends.base import ALL_GATHER_MM, MM_ALL_REDUCE, MM_REDUCE_SCATTER, Backend, FusedCall
from fcpass.config import PassConfig
from fcpass.groups import resolve_group
from fcpass.matmuls import Matmul, OneDNNMatmul, tensor_signature
from fcpass.padding import append_zero_rows, with_zero_rows
from fcpass.vllm import state

_eager_config = PassConfig()


def configure(config: PassConfig) -> None:
    """Set the config of eager calls (ops called without a ``config`` text); equal on every rank.

    Compiled graphs never read it: FlashCommPass gives every op it emits its own config.
    """
    global _eager_config
    if not isinstance(config, PassConfig):
        raise TypeError(f"configure() takes a fcpass.PassConfig, got {type(config).__name__}")
    _eager_config = config
    _plans.clear()  # the eager calls' plans were made under the config it replaces


def runtime_config() -> PassConfig:
    """The config of eager calls (see :func:`configure`)."""
    return _eager_config


def _config_of(op: str, text: str) -> PassConfig:
    if not text:
        return _eager_config
    try:
        return PassConfig.from_runtime_text(text)
    except ValueError as exc:
        raise validate.FusedOpInputError(f"fcpass::{op}: config argument: {exc}") from None


_FAMILY_FLAG = {MM_REDUCE_SCATTER: "fuse_mm_reduce_scatter", ALL_GATHER_MM: "fuse_all_gather_mm",
                MM_ALL_REDUCE: "fuse_mm_all_reduce"}


class Plan(NamedTuple):
    """What validation and the guard concluded for one call signature: the path and how to run it."""

    facts: guard.GuardFacts
    decision: guard.Decision
    backend: Backend | None
    pipeline_chunks: int  # fused path: the config's, else the table's; 0: the backend's choice
    symmetric_memory: bool  # the config's cuda_symmetric_memory, unless its workspace could not be reserved


# Call signature -> Plan. Validation and the guard read only the inputs' shapes, dtypes and device, the
# scalar arguments and the config (its text is part of the key; configure() clears the eager calls'), and a
# model repeats a handful of signatures on every forward step: each is planned once and looked up
# afterwards. Bounded.
# A backend's state of the group (CUDA: symmetric memory enabled) is read when planning, so it is set
# before the first call, as vLLM sets it at startup.
_plans: dict[tuple, Plan] = {}
MAX_PLANS = 4096


def plan(op: str, family: str, call: FusedCall, threshold_tokens: int, config: PassConfig) -> Plan:
    """The guard's decision for a validated call, with the backend and chunk count its path runs with."""
    call = call._replace(symmetric_memory=config.cuda_symmetric_memory)  # the CUDA backend's limits read it
    x, device, mms = call.x, call.x.device, call.matmuls
    rows, k = x.shape
    num_tokens = rows * call.world_size if family == ALL_GATHER_MM else rows + call.pad_rows
    facts = guard.GuardFacts(
        op=op, num_tokens=num_tokens, world_size=call.world_size, dtype=x.dtype,
        k=k, n=mms[0].n if len(mms) == 1 else sum(mm.n for mm in mms), device_type=device.type,
    )
    backend: Backend | None = select_backend(config.backend, device)
    off_reason = (
        guard.BACKEND_OFF if backend is None
        else guard.FAMILY_DISABLED if not getattr(config, _FAMILY_FLAG[family])
        else _onednn_off_reason(call, backend) or backend.unsupported(family, call)
    )
    limits = None if off_reason else backend.limits(family, call)
    threshold = _resolve_threshold(threshold_tokens, config, backend, family, facts)
    decision = guard.decide(facts, threshold, limits, config.max_world_size, off_reason)
    chunks = _table_chunks(config, backend, family, facts) if decision.fused else 0
    symmetric_memory = config.cuda_symmetric_memory and (not decision.fused or backend.reserve(family, call))
    return Plan(facts, decision, backend, chunks, symmetric_memory)


def _run(op: str, family: str, x: torch.Tensor, mms: tuple, row_scale: torch.Tensor | None, group_name: str,
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
            return _unfused(traced_family, site, x, mms, row_scale, world_size, group_name, pad_rows)
    group = None
    if world_size is None:
        group = resolve_group(group_name)  # by name on every call: a name can outlive its group
        world_size = group.size()
    key = (op, family, x.shape, x.dtype, x.device, tensor_signature(row_scale), group_name, world_size,
           threshold_tokens, pad_rows, config, site, *[mm.signature() for mm in mms])
    planned = _plans.get(key)
    if planned is None:
        if family == MM_REDUCE_SCATTER:
            _check_rs(op, x, mms[0], row_scale, world_size, pad_rows)
        elif family == MM_ALL_REDUCE:
            _check_ar(op, x, mms[0], row_scale, world_size)
        else:
            _check_ag(op, x, mms, world_size)
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
    guard.record(planned.facts, planned.decision)
    if not planned.decision.fused:
        return _unfused(traced_family, site, x, mms, row_scale, world_size, group_name, pad_rows)
    if planned.pipeline_chunks or planned.symmetric_memory:
        call = call._replace(pipeline_chunks=planned.pipeline_chunks, symmetric_memory=planned.symmetric_memory)
    if family == MM_REDUCE_SCATTER:
        return planned.backend.mm_reduce_scatter(with_zero_rows(call))
    if family == MM_ALL_REDUCE:
        return planned.backend.mm_all_reduce(call)
    return planned.backend.all_gather_mm(call)


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


def _unfused(family: str, site: sites.Site, x: torch.Tensor, mms: tuple, row_scale: torch.Tensor | None,
             world_size: int | None, group_name: str, pad_rows: int):
    """What the graph did at the site: its own matmul op(s) and its own collective op, with its arguments.

    ``family`` is the traced one (a vllm-ascend scatter stays a scatter: its op decides what it does).
    """
    if family == ALL_GATHER_MM:
        return _unfused_all_gather_mm(site, x, mms, world_size, group_name)
    (mm,) = mms
    product = mm(x, row_scale)
    if family == MM_ALL_REDUCE:
        return sites.all_reduce(site, product, group_name)
    if pad_rows and site.collective != sites.VLLM_ASCEND:  # vllm-ascend's op pads by its own pad_size
        product = append_zero_rows(product, pad_rows)
    return sites.reduce_scatter(site, product, world_size, group_name)


def _unfused_all_gather_mm(site: sites.Site, x: torch.Tensor, mms: tuple, world_size: int | None, group_name: str):
    gathered = sites.all_gather(site, x, world_size, group_name)
    if gathered is x:  # vllm-ascend with FlashComm off: its op keeps the local rows; an op returns new tensors
        gathered = x.clone()
    outs = [mm(gathered) for mm in mms]
    if site.collective == sites.VLLM_ASCEND:  # its op dropped its pad rows: put back what drop_token_padding drops
        missing = x.shape[0] * world_size - gathered.shape[0]
        if 0 < missing == state.ascend_pad_size():
            gathered, outs = append_zero_rows(gathered, missing), [append_zero_rows(out, missing) for out in outs]
    return gathered, outs


def never_fused(family: str, device: torch.device, config: PassConfig) -> str | None:
    """Why every call of ``family`` on ``device`` tensors would take the unfused path under ``config``: its
    backend's default threshold is never passed, and neither the config's ``threshold_tokens`` nor its table
    gives another; None where some call may fuse. Read by the rewrite (the device is in the graph, equal on
    every rank), which then leaves the site as it was."""
    backend = select_backend(config.backend, device)
    if backend is None or config.threshold_tokens is not None or not getattr(config, _FAMILY_FLAG[family]):
        return None
    table = config.table()
    if table is not None and table.backend == backend.name and any(key[0] == family for key in table.entries):
        return None
    return backend.never_pays(family, device.type)


def _onednn_off_reason(call: FusedCall, backend: Backend) -> str | None:
    if not isinstance(call.matmuls[0], OneDNNMatmul):
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


# --------------------------------------------------------------------------
# Op bodies: build the Matmul(s), then _run (validate and plan once per signature, run). The fake impls run the
# same validation and return shapes only.


def _check_rs(op, x, mm, row_scale, world_size, pad_rows) -> None:
    validate.check_world_size(op, world_size)
    validate.check_matmul(op, x, mm)
    if row_scale is not None:
        validate.check_row_scale(op, x, row_scale)
    validate.check_pad_rows(op, mm, pad_rows)
    validate.check_divisible(op, x.shape[0] + pad_rows, world_size)


def _check_ar(op, x, mm, row_scale, world_size) -> None:
    validate.check_world_size(op, world_size)
    _check_ar_trace(op, x, mm, row_scale)


def _check_ag(op, x, mms, world_size) -> None:
    validate.check_world_size(op, world_size)
    if not mms:
        raise validate.FusedOpInputError(f"fcpass::{op}: needs at least one weight")
    for i, mm in enumerate(mms):
        validate.check_matmul(op, x, mm, i)


def _zip_lists(op, ws, others, what):
    if len(others) != len(ws):
        raise validate.FusedOpInputError(f"fcpass::{op}: {len(ws)} weights but {len(others)} {what}")
    return zip(ws, others)


def _site_of(op: str, text: str, num_matmuls: int) -> sites.Site:
    site = sites.parse(op, text)
    if site.matmuls and len(site.matmuls) != num_matmuls:
        raise validate.FusedOpInputError(
            f"fcpass::{op}: site {text!r} names {len(site.matmuls)} matmul forms for {num_matmuls} matmuls")
    return site


def _split_x_scale(x_scale):
    """A per-tensor scale (0-d or (1,)) stays on the Matmul; a per-token (m, 1) one travels with the rows.

    Decided by rank, not numel, so a symbolic token count is never guarded on.
    """
    if x_scale is None or x_scale.dim() < 2:
        return x_scale, None
    return None, x_scale


def _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype, form=""):
    """A row-parallel op's scaled Matmul, and the per-token scale that travels with the rows (or None)."""
    per_tensor, per_token = _split_x_scale(x_scale)
    return Matmul(w, bias, w_scale=w_scale, x_scale=per_tensor, out_dtype=out_dtype, form=form), per_token


@oplib.define("mm_reduce_scatter")
def mm_reduce_scatter(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
    group_name: str, world_size: int, threshold_tokens: int, pad_rows: int = 0, config: str = "",
    site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_reduce_scatter", site, 1)
    return _run(
        "mm_reduce_scatter", MM_REDUCE_SCATTER, x, (Matmul(w, bias, form=at.matmul(0)),), None,
        group_name, world_size, threshold_tokens, pad_rows, config, at
    )


@oplib.fake("mm_reduce_scatter")
def _(x, w, bias, group_name, world_size, threshold_tokens, pad_rows=0, config="", site=""):
    _site_of("mm_reduce_scatter", site, 1)
    _check_rs("mm_reduce_scatter", x, Matmul(w, bias), None, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, w.shape[1]))


@oplib.define("mm_reduce_scatter_scaled")
def mm_reduce_scatter_scaled(
    x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
    group_name: str, world_size: int, threshold_tokens: int, pad_rows: int = 0, config: str = "",
    site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_reduce_scatter_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype, at.matmul(0))
    return _run(
        "mm_reduce_scatter_scaled", MM_REDUCE_SCATTER, x, (mm,), per_token,
        group_name, world_size, threshold_tokens, pad_rows, config, at
    )


@oplib.fake("mm_reduce_scatter_scaled")
def _(x, w, x_scale, w_scale, bias, out_dtype, group_name, world_size, threshold_tokens, pad_rows=0, config="",
      site=""):
    _site_of("mm_reduce_scatter_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype)
    _check_rs("mm_reduce_scatter_scaled", x, mm, per_token, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, w.shape[1]), dtype=out_dtype)


def _gather_run(op, x, mms, group_name, world_size, threshold_tokens, config, site):
    gathered, outs = _run(op, ALL_GATHER_MM, x, tuple(mms), None, group_name, world_size, threshold_tokens, 0,
                          config, site)
    return gathered, list(outs)


@oplib.define("all_gather_mm")
def all_gather_mm(
    x: torch.Tensor, ws: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    group_name: str, world_size: int, threshold_tokens: int, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    at = _site_of("all_gather_mm", site, len(ws))
    mms = [Matmul(w, b, form=at.matmul(i)) for i, (w, b) in enumerate(_zip_lists("all_gather_mm", ws, biases, "biases"))]
    return _gather_run("all_gather_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_mm")
def _(x, ws, biases, group_name, world_size, threshold_tokens, config="", site=""):
    _site_of("all_gather_mm", site, len(ws))
    mms = [Matmul(w, b) for w, b in _zip_lists("all_gather_mm", ws, biases, "biases")]
    _check_ag("all_gather_mm", x, mms, world_size)
    rows = x.shape[0] * world_size
    return x.new_empty((rows, x.shape[1])), [x.new_empty((rows, w.shape[1])) for w in ws]


def _scaled_matmuls(op, ws, w_scales, biases, x_scale, out_dtype, site=sites.EAGER):
    if x_scale is not None and x_scale.dim() >= 2:
        raise validate.FusedOpInputError(
            f"fcpass::{op}: x_scale must be per-tensor (the gathered rows share it); "
            f"got shape {tuple(x_scale.shape)}"
        )
    _zip_lists(op, ws, w_scales, "w_scales")
    return [
        Matmul(w, b, w_scale=w_scale, x_scale=x_scale, out_dtype=out_dtype, form=site.matmul(i))
        for i, ((w, b), w_scale) in enumerate(zip(_zip_lists(op, ws, biases, "biases"), w_scales))
    ]


@oplib.define("all_gather_scaled_mm")
def all_gather_scaled_mm(
    x: torch.Tensor, x_scale: torch.Tensor | None, ws: Sequence[torch.Tensor],
    w_scales: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], out_dtype: torch.dtype,
    group_name: str, world_size: int, threshold_tokens: int, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    at = _site_of("all_gather_scaled_mm", site, len(ws))
    mms = _scaled_matmuls("all_gather_scaled_mm", ws, w_scales, biases, x_scale, out_dtype, at)
    return _gather_run("all_gather_scaled_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_scaled_mm")
def _(x, x_scale, ws, w_scales, biases, out_dtype, group_name, world_size, threshold_tokens, config="",
      site=""):
    _site_of("all_gather_scaled_mm", site, len(ws))
    mms = _scaled_matmuls("all_gather_scaled_mm", ws, w_scales, biases, x_scale, out_dtype)
    _check_ag("all_gather_scaled_mm", x, mms, world_size)
    rows = x.shape[0] * world_size
    return x.new_empty((rows, x.shape[1])), [x.new_empty((rows, w.shape[1]), dtype=out_dtype) for w in ws]


@oplib.define("mm_reduce_scatter_onednn")
def mm_reduce_scatter_onednn(
    x: torch.Tensor, handler: torch.Tensor, n: int, bias: torch.Tensor | None,
    group_name: str, world_size: int, threshold_tokens: int, pad_rows: int = 0, config: str = "",
    site: str = "",
) -> torch.Tensor:
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    return _run(
        "mm_reduce_scatter_onednn", MM_REDUCE_SCATTER, x, (mm,), None,
        group_name, world_size, threshold_tokens, pad_rows, config, _site_of("mm_reduce_scatter_onednn", site, 1)
    )


@oplib.fake("mm_reduce_scatter_onednn")
def _(x, handler, n, bias, group_name, world_size, threshold_tokens, pad_rows=0, config="", site=""):
    _site_of("mm_reduce_scatter_onednn", site, 1)
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    _check_rs("mm_reduce_scatter_onednn", x, mm, None, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, n))


def _onednn_matmuls(op, x, handlers, ns, biases):
    _zip_lists(op, handlers, ns, "ns")
    return [OneDNNMatmul(h, n, x.dtype, b) for (h, b), n in zip(_zip_lists(op, handlers, biases, "biases"), ns)]


@oplib.define("all_gather_onednn_mm")
def all_gather_onednn_mm(
    x: torch.Tensor, handlers: Sequence[torch.Tensor], ns: Sequence[int], biases: Sequence[torch.Tensor | None],
    group_name: str, world_size: int, threshold_tokens: int, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mms = _onednn_matmuls("all_gather_onednn_mm", x, handlers, ns, biases)
    at = _site_of("all_gather_onednn_mm", site, len(mms))
    return _gather_run("all_gather_onednn_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_onednn_mm")
def _(x, handlers, ns, biases, group_name, world_size, threshold_tokens, config="", site=""):
    mms = _onednn_matmuls("all_gather_onednn_mm", x, handlers, ns, biases)
    _site_of("all_gather_onednn_mm", site, len(mms))
    _check_ag("all_gather_onednn_mm", x, mms, world_size)
    rows = x.shape[0] * world_size
    return x.new_empty((rows, x.shape[1])), [x.new_empty((rows, n)) for n in ns]


# ---- mm_all_reduce: the row-parallel linear's product summed over the ranks; no shapes change, so no world_size
# argument: the group's size is read when the op is called (rank-equal, like the name it is read from).


def _all_reduce(op: str, x, mm, row_scale, group_name: str, threshold_tokens: int, config: str,
                site: sites.Site) -> torch.Tensor:
    return _run(op, MM_ALL_REDUCE, x, (mm,), row_scale, group_name, None, threshold_tokens, 0, config, site)


def _check_ar_trace(op, x, mm, row_scale) -> None:
    validate.check_matmul(op, x, mm)
    if row_scale is not None:
        validate.check_row_scale(op, x, row_scale)


@oplib.define("mm_all_reduce")
def mm_all_reduce(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_name: str, threshold_tokens: int,
    config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_all_reduce", site, 1)
    return _all_reduce("mm_all_reduce", x, Matmul(w, bias, form=at.matmul(0)), None, group_name, threshold_tokens,
                       config, at)


@oplib.fake("mm_all_reduce")
def _(x, w, bias, group_name, threshold_tokens, config="", site=""):
    _site_of("mm_all_reduce", site, 1)
    _check_ar_trace("mm_all_reduce", x, Matmul(w, bias), None)
    return x.new_empty((x.shape[0], w.shape[1]))


@oplib.define("mm_all_reduce_scaled")
def mm_all_reduce_scaled(
    x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, group_name: str, threshold_tokens: int, config: str = "",
    site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_all_reduce_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype, at.matmul(0))
    return _all_reduce("mm_all_reduce_scaled", x, mm, per_token, group_name, threshold_tokens, config, at)


@oplib.fake("mm_all_reduce_scaled")
def _(x, w, x_scale, w_scale, bias, out_dtype, group_name, threshold_tokens, config="", site=""):
    _site_of("mm_all_reduce_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype)
    _check_ar_trace("mm_all_reduce_scaled", x, mm, per_token)
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype)


@oplib.define("mm_all_reduce_onednn")
def mm_all_reduce_onednn(
    x: torch.Tensor, handler: torch.Tensor, n: int, bias: torch.Tensor | None, group_name: str,
    threshold_tokens: int, config: str = "", site: str = "",
) -> torch.Tensor:
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    return _all_reduce("mm_all_reduce_onednn", x, mm, None, group_name, threshold_tokens, config,
                       _site_of("mm_all_reduce_onednn", site, 1))


@oplib.fake("mm_all_reduce_onednn")
def _(x, handler, n, bias, group_name, threshold_tokens, config="", site=""):
    _site_of("mm_all_reduce_onednn", site, 1)
    _check_ar_trace("mm_all_reduce_onednn", x, OneDNNMatmul(handler, n, x.dtype, bias), None)
    return x.new_empty((x.shape[0], n))
