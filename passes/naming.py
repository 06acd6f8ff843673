"""How a site is named in the report: the collective's form, the matmul's form, the steps between them."""

from __future__ import annotations

from passes.collectives import Collective
from passes.matmuls import MatmulNode
from passes.rows import step_name


def site_form(collective: Collective, mm: MatmulNode | None, other, steps) -> str:
    """How a site is named in reports: collective form / matmul form, plus the steps between them."""
    name = f"{collective.form}/{mm.form if mm else getattr(other, 'target', other)}"
    return "+".join([name, *sorted({step_name(step) for step in steps})])
