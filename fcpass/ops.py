"""The fused custom ops ``torch.ops.fcpass.*``: their schemas (the contract), fakes, and the Matmuls they build.

Each op is opaque to Inductor (a custom op with a fake impl that reads input
shapes only) and carries the guard inside, so a compiled graph holds the op
for every token count and never recompiles over the fused/unfused choice:

    mm_reduce_scatter(x, w, bias, group_name, world_size, threshold_tokens=-1, pad_rows=0, config="", site="")
        = reduce_scatter(pad(x @ w + bias, pad_rows zero rows), dim 0, SUM)
                                                   ((m + pad_rows)/ws, n)
    all_gather_mm(x, ws, biases, group_name, world_size, threshold_tokens=-1, config="", site="")
        = g = all_gather(x, dim 0); (g, [g @ w_i + b_i])
    mm_all_reduce(x, w, bias, group_name, threshold_tokens=-1, config="", site="")
        = all_reduce(x @ w + bias, SUM)               (m, n)
        (no world_size: no shape depends on it, so the graph needs no group
        at compile time; the op reads the group's size when called)
    mm_reduce_scatter_scaled / all_gather_scaled_mm / mm_all_reduce_scaled: the same over
        W8A8 (int8, per-channel dequant scale, int32 quant bias) and fp8
        (``_scaled_mm``) matmuls, with an output dtype.
    mm_reduce_scatter_onednn / all_gather_onednn_mm / mm_all_reduce_onednn: the same over vLLM's
        CPU oneDNN matmul, whose weight exists only inside its handler:
        (x, handler, n, bias, ...) in place of (x, w, bias, ...).

``config``: a ``PassConfig.runtime_text()`` ("" : this process's
``fcpass.configure``); it is the one threshold channel of a compiled graph's
ops (the rewrite passes no ``threshold_tokens``: -1, ``CONFIG_THRESHOLD``, "the
config's"); an eager caller may pass its own. ``site``: the
collective and matmul ops the graph had at the site (:mod:`fcpass.sites`),
which the unfused path runs. What a call does: :mod:`fcpass.dispatch`; each
family's checks, unfused path and fused path: :mod:`fcpass.families`.
"""


from __future__ import annotations

from collections.abc import Sequence

import torch

from fcpass import oplib, sites, validate
from fcpass.backends.base import ALL_GATHER_MM, MM_ALL_REDUCE, MM_REDUCE_SCATTER
from fcpass.dispatch import CONFIG_THRESHOLD, run
from fcpass.families import FAMILIES
from fcpass.matmuls import Matmul, OneDNNMatmul, SumOfProducts

# matmul kind -> family -> the op fusing that family over that kind of matmul: the table the rewrite emits from
# (passes/matmuls.py, KINDS), so an op's name is written here and nowhere else.
FUSED_OPS = {
    "plain": {MM_REDUCE_SCATTER: "mm_reduce_scatter", ALL_GATHER_MM: "all_gather_mm", MM_ALL_REDUCE: "mm_all_reduce"},
    "scaled": {MM_REDUCE_SCATTER: "mm_reduce_scatter_scaled", ALL_GATHER_MM: "all_gather_scaled_mm",
               MM_ALL_REDUCE: "mm_all_reduce_scaled"},
    "onednn": {MM_REDUCE_SCATTER: "mm_reduce_scatter_onednn", ALL_GATHER_MM: "all_gather_onednn_mm",
               MM_ALL_REDUCE: "mm_all_reduce_onednn"},
}

# matmul kind -> the op fusing a reduce_scatter after a sum of products of that kind (Falcon's attention + MLP).
SUM_FUSED_OPS = {"plain": "mm_sum_reduce_scatter", "onednn": "mm_sum_reduce_scatter_onednn"}

# The fake impls run each family's input check too: a site the op would reject is never rewritten.
_check_rs, _check_ag = FAMILIES[MM_REDUCE_SCATTER].check, FAMILIES[ALL_GATHER_MM].check
_check_ar = FAMILIES[MM_ALL_REDUCE].check


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
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, pad_rows: int = 0,
    config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_reduce_scatter", site, 1)
    return run(
        "mm_reduce_scatter", MM_REDUCE_SCATTER, x, (Matmul(w, bias, form=at.matmul(0)),), None,
        group_name, world_size, threshold_tokens, pad_rows, config, at
    )


@oplib.fake("mm_reduce_scatter")
def _(x, w, bias, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, pad_rows=0, config="", site=""):
    _site_of("mm_reduce_scatter", site, 1)
    _check_rs("mm_reduce_scatter", x, (Matmul(w, bias),), None, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, w.shape[1]))


@oplib.define("mm_reduce_scatter_scaled")
def mm_reduce_scatter_scaled(
    x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, pad_rows: int = 0,
    config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_reduce_scatter_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype, at.matmul(0))
    return run(
        "mm_reduce_scatter_scaled", MM_REDUCE_SCATTER, x, (mm,), per_token,
        group_name, world_size, threshold_tokens, pad_rows, config, at
    )


@oplib.fake("mm_reduce_scatter_scaled")
def _(x, w, x_scale, w_scale, bias, out_dtype, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD,
      pad_rows=0, config="", site=""):
    _site_of("mm_reduce_scatter_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype)
    _check_rs("mm_reduce_scatter_scaled", x, (mm,), per_token, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, w.shape[1]), dtype=out_dtype)


# ---- a reduce_scatter after a sum of products: the same family, the products' inputs beside their weights


def _sum_run(op, xs, mms, group_name, world_size, threshold_tokens, pad_rows, config, site):
    return run(op, MM_REDUCE_SCATTER, xs[0], (_sum_of(op, xs, mms),), None,
               group_name, world_size, threshold_tokens, pad_rows, config, site)


def _sum_of(op, xs, mms) -> SumOfProducts:
    if len(xs) != len(mms):
        raise validate.FusedOpInputError(f"fcpass::{op}: {len(mms)} weights but {len(xs)} xs")
    return SumOfProducts(tuple(mms), tuple(xs[1:]))


def _sum_fake(op, xs, mms, world_size, pad_rows):
    _check_rs(op, xs[0], (_sum_of(op, xs, mms),), None, world_size, pad_rows)
    return xs[0].new_empty(((xs[0].shape[0] + pad_rows) // world_size, mms[0].n))


@oplib.define("mm_sum_reduce_scatter")
def mm_sum_reduce_scatter(
    xs: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, pad_rows: int = 0,
    config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_sum_reduce_scatter", site, len(ws))
    mms = [Matmul(w, b, form=at.matmul(i)) for i, (w, b) in enumerate(_zip_lists("mm_sum_reduce_scatter", ws, biases,
                                                                                  "biases"))]
    return _sum_run("mm_sum_reduce_scatter", xs, mms, group_name, world_size, threshold_tokens, pad_rows, config, at)


@oplib.fake("mm_sum_reduce_scatter")
def _(xs, ws, biases, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, pad_rows=0, config="", site=""):
    _site_of("mm_sum_reduce_scatter", site, len(ws))
    mms = [Matmul(w, b) for w, b in _zip_lists("mm_sum_reduce_scatter", ws, biases, "biases")]
    return _sum_fake("mm_sum_reduce_scatter", xs, mms, world_size, pad_rows)


@oplib.define("mm_sum_reduce_scatter_onednn")
def mm_sum_reduce_scatter_onednn(
    xs: Sequence[torch.Tensor], handlers: Sequence[torch.Tensor], ns: Sequence[int],
    biases: Sequence[torch.Tensor | None], group_name: str, world_size: int,
    threshold_tokens: int = CONFIG_THRESHOLD, pad_rows: int = 0, config: str = "", site: str = "",
) -> torch.Tensor:
    mms = _onednn_matmuls("mm_sum_reduce_scatter_onednn", xs[0], handlers, ns, biases)
    at = _site_of("mm_sum_reduce_scatter_onednn", site, len(mms))
    return _sum_run("mm_sum_reduce_scatter_onednn", xs, mms, group_name, world_size, threshold_tokens, pad_rows,
                    config, at)


@oplib.fake("mm_sum_reduce_scatter_onednn")
def _(xs, handlers, ns, biases, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, pad_rows=0, config="",
      site=""):
    mms = _onednn_matmuls("mm_sum_reduce_scatter_onednn", xs[0], handlers, ns, biases)
    _site_of("mm_sum_reduce_scatter_onednn", site, len(mms))
    return _sum_fake("mm_sum_reduce_scatter_onednn", xs, mms, world_size, pad_rows)


def _gather_run(op, x, mms, group_name, world_size, threshold_tokens, config, site):
    gathered, outs = run(op, ALL_GATHER_MM, x, tuple(mms), None, group_name, world_size, threshold_tokens, 0,
                          config, site)
    return gathered, list(outs)


@oplib.define("all_gather_mm")
def all_gather_mm(
    x: torch.Tensor, ws: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    at = _site_of("all_gather_mm", site, len(ws))
    pairs = _zip_lists("all_gather_mm", ws, biases, "biases")
    mms = [Matmul(w, b, form=at.matmul(i)) for i, (w, b) in enumerate(pairs)]
    return _gather_run("all_gather_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_mm")
def _(x, ws, biases, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, config="", site=""):
    _site_of("all_gather_mm", site, len(ws))
    mms = [Matmul(w, b) for w, b in _zip_lists("all_gather_mm", ws, biases, "biases")]
    _check_ag("all_gather_mm", x, mms, None, world_size)
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
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    at = _site_of("all_gather_scaled_mm", site, len(ws))
    mms = _scaled_matmuls("all_gather_scaled_mm", ws, w_scales, biases, x_scale, out_dtype, at)
    return _gather_run("all_gather_scaled_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_scaled_mm")
def _(x, x_scale, ws, w_scales, biases, out_dtype, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD,
      config="", site=""):
    _site_of("all_gather_scaled_mm", site, len(ws))
    mms = _scaled_matmuls("all_gather_scaled_mm", ws, w_scales, biases, x_scale, out_dtype)
    _check_ag("all_gather_scaled_mm", x, mms, None, world_size)
    rows = x.shape[0] * world_size
    return x.new_empty((rows, x.shape[1])), [x.new_empty((rows, w.shape[1]), dtype=out_dtype) for w in ws]


@oplib.define("mm_reduce_scatter_onednn")
def mm_reduce_scatter_onednn(
    x: torch.Tensor, handler: torch.Tensor, n: int, bias: torch.Tensor | None,
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, pad_rows: int = 0,
    config: str = "", site: str = "",
) -> torch.Tensor:
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    return run(
        "mm_reduce_scatter_onednn", MM_REDUCE_SCATTER, x, (mm,), None,
        group_name, world_size, threshold_tokens, pad_rows, config, _site_of("mm_reduce_scatter_onednn", site, 1)
    )


@oplib.fake("mm_reduce_scatter_onednn")
def _(x, handler, n, bias, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, pad_rows=0, config="",
      site=""):
    _site_of("mm_reduce_scatter_onednn", site, 1)
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    _check_rs("mm_reduce_scatter_onednn", x, (mm,), None, world_size, pad_rows)
    return x.new_empty(((x.shape[0] + pad_rows) // world_size, n))


def _onednn_matmuls(op, x, handlers, ns, biases):
    _zip_lists(op, handlers, ns, "ns")
    return [OneDNNMatmul(h, n, x.dtype, b) for (h, b), n in zip(_zip_lists(op, handlers, biases, "biases"), ns)]


@oplib.define("all_gather_onednn_mm")
def all_gather_onednn_mm(
    x: torch.Tensor, handlers: Sequence[torch.Tensor], ns: Sequence[int], biases: Sequence[torch.Tensor | None],
    group_name: str, world_size: int, threshold_tokens: int = CONFIG_THRESHOLD, config: str = "", site: str = "",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    mms = _onednn_matmuls("all_gather_onednn_mm", x, handlers, ns, biases)
    at = _site_of("all_gather_onednn_mm", site, len(mms))
    return _gather_run("all_gather_onednn_mm", x, mms, group_name, world_size, threshold_tokens, config, at)


@oplib.fake("all_gather_onednn_mm")
def _(x, handlers, ns, biases, group_name, world_size, threshold_tokens=CONFIG_THRESHOLD, config="", site=""):
    mms = _onednn_matmuls("all_gather_onednn_mm", x, handlers, ns, biases)
    _site_of("all_gather_onednn_mm", site, len(mms))
    _check_ag("all_gather_onednn_mm", x, mms, None, world_size)
    rows = x.shape[0] * world_size
    return x.new_empty((rows, x.shape[1])), [x.new_empty((rows, n)) for n in ns]


# ---- mm_all_reduce: the row-parallel linear's product summed over the ranks; no shapes change, so no world_size
# argument: the group's size is read when the op is called (rank-equal, like the name it is read from).


def _all_reduce(op: str, x, mm, row_scale, group_name: str, threshold_tokens: int, config: str,
                site: sites.Site) -> torch.Tensor:
    return run(op, MM_ALL_REDUCE, x, (mm,), row_scale, group_name, None, threshold_tokens, 0, config, site)


@oplib.define("mm_all_reduce")
def mm_all_reduce(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_name: str,
    threshold_tokens: int = CONFIG_THRESHOLD, config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_all_reduce", site, 1)
    return _all_reduce("mm_all_reduce", x, Matmul(w, bias, form=at.matmul(0)), None, group_name, threshold_tokens,
                       config, at)


@oplib.fake("mm_all_reduce")
def _(x, w, bias, group_name, threshold_tokens=CONFIG_THRESHOLD, config="", site=""):
    _site_of("mm_all_reduce", site, 1)
    _check_ar("mm_all_reduce", x, (Matmul(w, bias),), None, None)
    return x.new_empty((x.shape[0], w.shape[1]))


@oplib.define("mm_all_reduce_scaled")
def mm_all_reduce_scaled(
    x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype, group_name: str, threshold_tokens: int = CONFIG_THRESHOLD,
    config: str = "", site: str = "",
) -> torch.Tensor:
    at = _site_of("mm_all_reduce_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype, at.matmul(0))
    return _all_reduce("mm_all_reduce_scaled", x, mm, per_token, group_name, threshold_tokens, config, at)


@oplib.fake("mm_all_reduce_scaled")
def _(x, w, x_scale, w_scale, bias, out_dtype, group_name, threshold_tokens=CONFIG_THRESHOLD, config="", site=""):
    _site_of("mm_all_reduce_scaled", site, 1)
    mm, per_token = _scaled_row_matmul(w, x_scale, w_scale, bias, out_dtype)
    _check_ar("mm_all_reduce_scaled", x, (mm,), per_token, None)
    return x.new_empty((x.shape[0], w.shape[1]), dtype=out_dtype)


@oplib.define("mm_all_reduce_onednn")
def mm_all_reduce_onednn(
    x: torch.Tensor, handler: torch.Tensor, n: int, bias: torch.Tensor | None, group_name: str,
    threshold_tokens: int = CONFIG_THRESHOLD, config: str = "", site: str = "",
) -> torch.Tensor:
    mm = OneDNNMatmul(handler, n, x.dtype, bias)
    return _all_reduce("mm_all_reduce_onednn", x, mm, None, group_name, threshold_tokens, config,
                       _site_of("mm_all_reduce_onednn", site, 1))


@oplib.fake("mm_all_reduce_onednn")
def _(x, handler, n, bias, group_name, threshold_tokens=CONFIG_THRESHOLD, config="", site=""):
    _site_of("mm_all_reduce_onednn", site, 1)
    _check_ar("mm_all_reduce_onednn", x, (OneDNNMatmul(handler, n, x.dtype, bias),), None, None)
    return x.new_empty((x.shape[0], n))
