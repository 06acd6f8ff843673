"""What the pass did at each collective it saw, or why it left it alone."""

from __future__ import annotations

import collections
from dataclasses import dataclass

FUSED = "fused"


@dataclass(frozen=True)
class SiteOutcome:
    family: str
    form: str  # collective form + matmul form, e.g. "vllm/mm"
    outcome: str  # FUSED or the reason it was not


class PassReport:
    def __init__(self) -> None:
        self.outcomes: list[SiteOutcome] = []

    def add(self, family: str, form: str, outcome: str) -> None:
        self.outcomes.append(SiteOutcome(family, form, outcome))

    def matched(self) -> dict[str, dict[str, int]]:
        """Fused sites per family and form."""
        counts: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for o in self.outcomes:
            if o.outcome == FUSED:
                counts[o.family][o.form] = counts[o.family].get(o.form, 0) + 1
        return {family: dict(forms) for family, forms in counts.items()}

    def table(self) -> str:
        rows = collections.Counter((o.family, o.form, o.outcome) for o in self.outcomes)
        lines = [f"{'family':<18} {'form':<24} {'outcome':<40} count"]
        lines += [f"{f:<18} {form:<24} {outcome:<40} {n}" for (f, form, outcome), n in sorted(rows.items())]
        return "\n".join(lines)
