"""The fusion families' one driver loop.

A family is written as pattern, condition, replacement: ``scan`` finds its
sites (and the collectives of its kind no form decodes), ``unfusable`` says
why a site cannot be fused, ``replace`` rewrites it (or says why the fused op
rejects it, leaving the graph as it was). The loop records every site with
what was done or why not; with the family's flag off it records only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from fcpass.config import PassConfig
from fcpass.families import FAMILIES
from passes.report import FAMILY_DISABLED, FUSED, PassReport, Reason


@dataclass(frozen=True)
class Fusion:
    """One fusion family as the pass drives it; a site is any record with a ``form`` (its report name)."""

    family: str  # a key of fcpass.families.FAMILIES (its config flag is read there)
    scan: Callable[[fx.Graph], tuple[Iterable, Iterable[tuple[str, str | Reason]]]]  # (sites, undecoded)
    unfusable: Callable[[object, PassConfig], str | Reason | None]
    replace: Callable[[fx.Graph, object, str], Reason | None]  # (graph, site, config text)


def fuse(fusion: Fusion, graph: fx.Graph, config: PassConfig, report: PassReport) -> None:
    """Fuse every site of ``fusion`` in ``graph``; record each with what was done or why not."""
    sites, undecoded = fusion.scan(graph)
    for form, reason in undecoded:
        report.add(fusion.family, f"{form}/-", reason)
    enabled = getattr(config, FAMILIES[fusion.family].config_flag)
    config_text = config.runtime_text()
    for site in sites:
        reason = fusion.unfusable(site, config) if enabled else FAMILY_DISABLED
        report.add(fusion.family, site.form, reason or fusion.replace(graph, site, config_text) or FUSED)
