"""What the pass did at each collective it saw, or why it left it alone."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from fcpass import guard

# Every outcome, named once: the families report these, tests compare them (never the wording).
FUSED = "fused"
SPLIT = "split (reduce_scatter, norm on the token shard, all_gather)"
APPLIED = (FUSED, SPLIT)
FAMILY_DISABLED = guard.FAMILY_DISABLED  # the op's guard and the report: one text
# any family
UNSUPPORTED_FORM = "unsupported form"  # + what about it
GROUP_MISMATCH = "world_size does not match the group"  # + sizes
NO_TP_GROUP = "vllm-ascend collective without a vLLM TP group at compile time"
REJECTED_BY_OP = "the fused op rejects it"  # + the op's validation message
MATMUL_ARGUMENTS = "matmul arguments change what the fused ops compute"  # + which
# mm_reduce_scatter
OPAQUE_MATMUL = "the matmul is inside an opaque op (its weight is not in the graph)"  # + the op, what it does
NOT_SUM = "reduce op is not sum"  # + the op
NOT_2D_ROWS = "reduce_scatter input is not 2-D rows"
NO_MATMUL_PRODUCER = "no matmul producer"
MATMUL_OTHER_USERS = "matmul output has other users"
FP8_PADDED = "fp8 matmul before a padded scatter (a bias could not be kept off the padded rows)"
SUM_KIND = "a sum of matmuls of these kinds has no fused op"  # + the sum's forms
PADDED_TWICE = "padded twice (explicit pad into a padding collective)"
# all_gather_mm
NO_MATMUL_CONSUMER = "no matmul consumer"
MIXED_MATMULS = "matmuls differ in kind or scaling (one fused op needs one kind)"
PER_TOKEN_SCALE = "per-token activation scale (computed after the gather)"
# sequence_parallel and mm_all_reduce
ALL_REDUCE_NOT_2D_ROWS = "all_reduce input is not 2-D token rows"
EP_COLLECTIVE = "expert-parallel collective (MoE token layout; no matmul fusion on it)"  # + the op
UNKNOWN_GROUP = "group unknown at compile time (its world size shapes the rewrite)"  # + the name
# mm_all_reduce
FASTER_TRANSPORT = "the all_reduce's transport is faster than the fused op's"  # + which transports
NEVER_FUSED = "the fused path is never taken here by default (no threshold or table asks for it)"  # + why
# sequence_parallel
SP_TRANSPORT = "the all_reduce's transport is faster than the split's"  # + which transports
SP_BELOW_THRESHOLD = "compiled for token counts not all above sequence_parallel_threshold_tokens"  # + both
SP_MIXED_REGION = "all_reduces of different forms or groups meet in one region"
SP_NO_NORM = "no norm (RMSNorm, LayerNorm) on the all_reduce's result (splitting it would shard nothing)"
SP_TOO_MANY_GATHERS = "more all_gathers than all_reduces"  # + counts

# The constants above, longest first (a constant may be the start of another's text).
_KINDS = sorted((value for name, value in dict(globals()).items() if name.isupper() and isinstance(value, str)),
                key=len, reverse=True)


def outcome_kind(text: str) -> str:
    """The constant an outcome's text names: the text is the constant, or the constant then " (detail)"."""
    return next((kind for kind in _KINDS if text == kind or text.startswith(kind + " (")), text)


@dataclass(frozen=True)
class Reason:
    """An outcome with what about this site: ``kind`` is one of the constants above, ``detail`` free text."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})"


@dataclass(frozen=True)
class SiteOutcome:
    family: str
    form: str  # collective form + matmul form, e.g. "vllm/mm"
    outcome: str  # FUSED / SPLIT or the reason it was not, as text (with its detail)
    kind: str  # the outcome's constant (FUSED, NO_MATMUL_PRODUCER, ...)


class PassReport:
    def __init__(self) -> None:
        self.outcomes: list[SiteOutcome] = []

    @classmethod
    def from_rows(cls, rows) -> "PassReport":
        """A report rebuilt from (family, form, outcome) rows, as read back from another process (each
        outcome's constant found again from its text)."""
        report = cls()
        for family, form, outcome in rows:
            report.outcomes.append(SiteOutcome(family, form, outcome, outcome_kind(outcome)))
        return report

    def rows(self) -> list[list[str]]:
        """[family, form, outcome] per site, the inverse of :meth:`from_rows`."""
        return [[o.family, o.form, o.outcome] for o in self.outcomes]

    def add(self, family: str, form: str, outcome: "str | Reason") -> None:
        kind = outcome.kind if isinstance(outcome, Reason) else outcome
        self.outcomes.append(SiteOutcome(family, form, str(outcome), kind))

    def kinds(self) -> list[tuple[str, str]]:
        """(family, outcome constant) per site, in graph order: what tests compare."""
        return [(o.family, o.kind) for o in self.outcomes]

    def matched(self) -> dict[str, dict[str, int]]:
        """Rewritten sites (fused, or split by sequence parallelism) per family and form."""
        counts: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for o in self.outcomes:
            if o.outcome in APPLIED:
                counts[o.family][o.form] = counts[o.family].get(o.form, 0) + 1
        return {family: dict(forms) for family, forms in counts.items()}

    def reasons(self) -> list[str]:
        """Why each site left alone was, as its constant, one per site, in graph order."""
        return [o.kind for o in self.outcomes if o.kind not in APPLIED]

    def summary(self, top: int = 2) -> str:
        """One line: sites rewritten per family, how many were left alone, and the ``top`` reasons why (the
        table has every site)."""
        if not self.outcomes:
            return "no all_reduce, reduce_scatter or all_gather in the graph"
        applied = collections.Counter(o.family for o in self.outcomes if o.outcome in APPLIED)
        done = ", ".join(f"{family} {n}" for family, n in sorted(applied.items())) or "nothing rewritten"
        reasons = self.reasons()
        why = collections.Counter(reasons).most_common(top)
        because = f" (most: {'; '.join(f'{kind} x{n}' for kind, n in why)})" if why else ""
        return f"{done}; {len(reasons)} of {len(self.outcomes)} sites left alone{because}"

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
