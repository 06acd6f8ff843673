"""What the pass did at each collective it saw, or why it left it alone."""

from __future__ import annotations

import collections
from dataclasses import dataclass

FUSED = "fused"
SPLIT = "split (reduce_scatter, norm on the token shard, all_gather)"
APPLIED = (FUSED, SPLIT)
FAMILY_DISABLED = "family disabled (PassConfig flag off)"


@dataclass(frozen=True)
class SiteOutcome:
    family: str
    form: str  # collective form + matmul form, e.g. "vllm/mm"
    outcome: str  # FUSED / SPLIT or the reason it was not


class PassReport:
    def __init__(self) -> None:
        self.outcomes: list[SiteOutcome] = []

    @classmethod
    def from_rows(cls, rows) -> "PassReport":
        """A report rebuilt from (family, form, outcome) rows, as read back from another process."""
        report = cls()
        for family, form, outcome in rows:
            report.add(family, form, outcome)
        return report

    def rows(self) -> list[list[str]]:
        """[family, form, outcome] per site, the inverse of :meth:`from_rows`."""
        return [[o.family, o.form, o.outcome] for o in self.outcomes]

    def add(self, family: str, form: str, outcome: str) -> None:
        self.outcomes.append(SiteOutcome(family, form, outcome))

    def matched(self) -> dict[str, dict[str, int]]:
        """Rewritten sites (fused, or split by sequence parallelism) per family and form."""
        counts: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for o in self.outcomes:
            if o.outcome in APPLIED:
                counts[o.family][o.form] = counts[o.family].get(o.form, 0) + 1
        return {family: dict(forms) for family, forms in counts.items()}

    def reasons(self) -> list[str]:
        """Every outcome other than fused or split, one per site, in graph order."""
        return [o.outcome for o in self.outcomes if o.outcome not in APPLIED]

    def summary(self) -> str:
        """One line: sites rewritten per family, and how many were left alone (the table says why)."""
        if not self.outcomes:
            return "no all_reduce, reduce_scatter or all_gather in the graph"
        applied = collections.Counter(o.family for o in self.outcomes if o.outcome in APPLIED)
        done = ", ".join(f"{family} {n}" for family, n in sorted(applied.items())) or "nothing rewritten"
        return f"{done}; {len(self.reasons())} of {len(self.outcomes)} sites left alone"

    def table(self) -> str:
        """One row per (family, form, outcome) with its site count: what was fused, and why the rest was not."""
        rows = collections.Counter((o.family, o.form, o.outcome) for o in self.outcomes)
        if not rows:
            return "no all_reduce, reduce_scatter or all_gather in the graph"
        form_width = max(28, *(len(form) for _, form, _ in rows))
        width = max(len(outcome) for _, _, outcome in rows)
        lines = [f"{'family':<18} {'form':<{form_width}} {'outcome':<{width}} sites"]
        lines += [f"{f:<18} {form:<{form_width}} {outcome:<{width}} {n:>5}"
                  for (f, form, outcome), n in sorted(rows.items())]
        return "\n".join(lines)
