"""The token-threshold guard: one pure predicate shared by every fused op.

Every rank must take the same path for the same call, or one rank runs a
fused kernel while another runs a plain collective and both hang. So the
decision reads only facts that are equal on every rank (token count, world
size, dtype, k, n, device type, the config and the kernel's static limits),
never a rank's own graph, bias or data.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)


class GuardFacts(NamedTuple):
    """Global facts of one fused-op call: equal on every rank by construction.

    A NamedTuple, not a frozen dataclass: built on every call, where a frozen dataclass costs ~1.4 us more.
    """

    op: str
    num_tokens: int  # rows entering the matmul: m for RS and AR, m * world_size for AG
    world_size: int
    dtype: torch.dtype
    k: int
    n: int
    device_type: str


@dataclass(frozen=True)
class KernelLimits:
    """What one backend's fused kernel accepts; unfused outside it."""

    max_world_size: int | None = None
    allowed_world_sizes: frozenset[int] | None = None
    k_min: int | None = None
    k_max_exclusive: int | None = None
    dtypes: frozenset[torch.dtype] | None = None
    # The kernel shards the tokens over the ranks (reduce_scatter, all_gather): world_size must divide them.
    shards_rows: bool = True

    def violation(self, facts: GuardFacts) -> str | None:
        if self.max_world_size is not None and facts.world_size > self.max_world_size:
            return f"world_size {facts.world_size} > kernel limit {self.max_world_size}"
        if self.allowed_world_sizes is not None and facts.world_size not in self.allowed_world_sizes:
            return f"world_size {facts.world_size} not in kernel's {sorted(self.allowed_world_sizes)}"
        if self.k_min is not None and facts.k < self.k_min:
            return f"k {facts.k} < kernel minimum {self.k_min}"
        if self.k_max_exclusive is not None and facts.k >= self.k_max_exclusive:
            return f"k {facts.k} >= kernel limit {self.k_max_exclusive}"
        if self.dtypes is not None and facts.dtype not in self.dtypes:
            return f"dtype {facts.dtype} not supported by kernel"
        if self.shards_rows and facts.num_tokens % facts.world_size:
            return f"tokens {facts.num_tokens} not divisible by world_size {facts.world_size}"
        return None


@dataclass(frozen=True)
class Decision:
    fused: bool
    reason: str

    @property
    def path(self) -> str:
        return "fused" if self.fused else "unfused"


BELOW_THRESHOLD = "tokens <= threshold"
ABOVE_THRESHOLD = "tokens > threshold"
BACKEND_OFF = "backend off"
FAMILY_DISABLED = "family disabled (PassConfig flag off)"  # the report says it in these words too
# A packed oneDNN weight cannot be widened to fold a bias, so its padded rows would carry the bias of the
# rank holding one; decided on the padding (global), never on the bias (rank 0 only).
PADDED_ONEDNN = "padded rows with a oneDNN matmul (its bias could not be kept off them)"
# vLLM's CPU linear has no weight tensor, only a packed handler: only the generic pipeline can call it.
ONEDNN_GENERIC_ONLY = "oneDNN matmul (vLLM CPU linear) runs on the generic pipeline only"


def decide(
    facts: GuardFacts,
    threshold_tokens: int,
    limits: KernelLimits | None,
    max_world_size: int,
    off_reason: str | None = None,
) -> Decision:
    """Fused iff above the threshold and inside the config's and kernel's limits.

    ``limits is None`` means fusion is switched off for this call, for ``off_reason``.
    """
    if limits is None:
        reason = off_reason or BACKEND_OFF
        return _CONSTANT_DECISIONS.get((False, reason)) or Decision(False, reason)
    if facts.num_tokens <= threshold_tokens:
        return _BELOW
    if facts.world_size > max_world_size:
        return Decision(False, f"world_size {facts.world_size} > max_world_size {max_world_size}")
    violation = limits.violation(facts)
    if violation is not None:
        return Decision(False, violation)
    return _ABOVE


# Built once: the common decisions are constants, and building a frozen dataclass per call would
# cost more than the whole decision.
_CONSTANT_DECISIONS = {
    (fused, reason): Decision(fused, reason)
    for fused, reason in ((False, BELOW_THRESHOLD), (True, ABOVE_THRESHOLD), (False, BACKEND_OFF),
                          (False, FAMILY_DISABLED), (False, PADDED_ONEDNN), (False, ONEDNN_GENERIC_ONLY))
}
_BELOW = _CONSTANT_DECISIONS[(False, BELOW_THRESHOLD)]
_ABOVE = _CONSTANT_DECISIONS[(True, ABOVE_THRESHOLD)]


# (op, "fused" | "unfused", reason) -> calls. A Counter increment is the
# whole observability cost on the hot path.
_decisions: collections.Counter[tuple[str, str, str]] = collections.Counter()


def record(facts: GuardFacts, decision: Decision) -> None:
    _decisions[(facts.op, decision.path, decision.reason)] += 1
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s: %s (%s) tokens=%d world_size=%d k=%d n=%d dtype=%s",
            facts.op, decision.path, decision.reason, facts.num_tokens,
            facts.world_size, facts.k, facts.n, facts.dtype,
        )


def decision_counts() -> dict[tuple[str, str, str], int]:
    """Snapshot of the decisions taken in this process so far."""
    return dict(_decisions)


def reset_decision_counts() -> None:
    _decisions.clear()
