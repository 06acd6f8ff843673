"""PassConfig: every fcpass switch, threshold and limit, validated once.

Defaults are defined here and nowhere else. The config is hashed into the
pass uuid (so a changed threshold changes the compile cache key) and travels
through vLLM's ``--additional-config`` as a plain dict, hence the strict
``from_dict``/``to_dict`` pair. A threshold table travels as its path; the
config loads it once, at construction, and its content digest goes into
``key()``, so editing the table changes the cache key too.

Into a compiled graph the config travels as text: ``runtime_text()`` (the
table inline, by content) is an argument of every fused op the pass emits,
and ``from_runtime_text`` turns it back into the config in any process. A
compile-cache hit skips the pass but keeps the graph's op arguments, so the
ops run with the config they were compiled with, on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

from fcpass import thresholds
from fcpass.limits import BACKEND_CHOICES, MAX_PIPELINE_CHUNKS, MAX_THRESHOLD_TOKENS, WORLD_SIZE_RANGE


@dataclass(frozen=True)
class PassConfig:
    """What fcpass fuses and when.

    fuse_mm_reduce_scatter / fuse_all_gather_mm / fuse_mm_all_reduce: the
        fusion families (matmul -> reduce_scatter, all_gather -> matmuls,
        matmul -> all_reduce). The last changes no shapes and needs no
        sequence parallelism: it fuses every row-parallel linear's
        all_reduce that sequence parallelism left (or was not asked to split).

    threshold_tokens: fuse when ``num_tokens > threshold_tokens``; None means
        the selected backend's measured default (Ascend: 1000).
    max_world_size: never fuse above this world size (the kernel's own limit
        still applies below it).
    backend: "auto" picks by tensor device (npu, cuda with symmetric memory,
        else generic); "off" keeps every op on its unfused path.
    pipeline_chunks: chunks of the generic overlapped pipeline; 0 picks by
        token count.
    sequence_parallel: split each all_reduce before an RMSNorm into
        reduce_scatter -> norm on the token shard -> all_gather (FlashComm v1),
        so the fusion families have collectives to fuse. A compile-time
        rewrite: applied only to graphs compiled for token counts all above
        ``sequence_parallel_threshold_tokens`` (vLLM compile ranges).
    sequence_parallel_threshold_tokens: SP applies to compile ranges whose
        smallest token count is above this. Default 1000, the Ascend fusion
        threshold: below it the fused ops would run unfused anyway, so the
        split would only add a pad and a slice.
    cuda_symmetric_memory: let the CUDA backend run torch's symmetric-memory
        fused ops where the group has symmetric memory (else it runs the
        generic pipeline on NCCL). Off by default: torch 2.15 reports every
        GPU group as enabled, so the backend would switch kernels without
        anyone asking, and those kernels raise when their workspace must grow
        during CUDA-graph capture, which vLLM does. Rank-equal (a config field).
    keep_faster_transports: leave alone the all_reduces whose transport is
        faster than the fused op's pipeline (vLLM's CPU shared-memory
        all_reduce: the pipeline's would run over gloo), whatever the
        threshold. False places the op there too: below its threshold it runs
        that site's own all_reduce, above it its pipeline; what
        benchmarks/below_threshold.py measures the op's presence with.
    threshold_table: path of a measured threshold table (fcpass.thresholds,
        written by ``python -m fcpass.calibrate``). An op's threshold is, first
        found: the op's own, ``threshold_tokens``, the table's bucket, the
        backend's default. Its pipeline_chunks apply where
        ``pipeline_chunks`` is 0. Loaded and validated here, once.
    """

    fuse_mm_reduce_scatter: bool = True
    fuse_all_gather_mm: bool = True
    fuse_mm_all_reduce: bool = True
    threshold_tokens: int | None = None
    max_world_size: int = 8
    backend: str = "auto"
    pipeline_chunks: int = 0
    sequence_parallel: bool = False
    sequence_parallel_threshold_tokens: int = 1000
    cuda_symmetric_memory: bool = False
    keep_faster_transports: bool = True
    threshold_table: str | None = None

    def __post_init__(self) -> None:
        for flag in ("fuse_mm_reduce_scatter", "fuse_all_gather_mm", "fuse_mm_all_reduce", "sequence_parallel",
                     "cuda_symmetric_memory", "keep_faster_transports"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"PassConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        t = self.threshold_tokens
        if t is not None and (not _is_int(t) or not 0 <= t <= MAX_THRESHOLD_TOKENS):
            raise ValueError(
                f"PassConfig.threshold_tokens must be None or an int in [0, {MAX_THRESHOLD_TOKENS}], got {t!r}"
            )
        t = self.sequence_parallel_threshold_tokens
        if not _is_int(t) or not 0 <= t <= MAX_THRESHOLD_TOKENS:
            raise ValueError(f"PassConfig.sequence_parallel_threshold_tokens must be an int in "
                             f"[0, {MAX_THRESHOLD_TOKENS}], got {t!r}")
        lo, hi = WORLD_SIZE_RANGE
        if not _is_int(self.max_world_size) or not lo <= self.max_world_size <= hi:
            raise ValueError(f"PassConfig.max_world_size must be an int in [{lo}, {hi}], got {self.max_world_size!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"PassConfig.backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        c = self.pipeline_chunks
        if not _is_int(c) or not 0 <= c <= MAX_PIPELINE_CHUNKS:
            raise ValueError(f"PassConfig.pipeline_chunks must be an int in [0, {MAX_PIPELINE_CHUNKS}], got {c!r}")
        # Not a field: the dict form stays the path, the instance keeps the content it was built with.
        object.__setattr__(self, "_table", self._load_table())

    def _load_table(self):
        path = self.threshold_table
        if path is None:
            return None
        if not isinstance(path, str) or not path:
            raise ValueError(f"PassConfig.threshold_table must be None or a file path, got {path!r}")
        try:
            return thresholds.load(path)
        except thresholds.ThresholdTableError as exc:
            raise ValueError(f"PassConfig.threshold_table: {exc}") from None

    def __eq__(self, other: object) -> bool:
        # The same path with other content is another config (as key() says).
        if not isinstance(other, PassConfig):
            return NotImplemented
        return self.key() == other.key()

    def table(self):
        """The loaded ``fcpass.thresholds.ThresholdTable``, or None without ``threshold_table``."""
        return self._table

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PassConfig":
        if not isinstance(values, Mapping):
            raise ValueError(f"fcpass config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fcpass PassConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Stable text of the whole config, for cache keys: the table by its content, not only its path."""
        values = self.to_dict()
        if self._table is not None:
            values["threshold_table_sha256"] = self._table.digest
        return json.dumps(values, sort_keys=True)

    def runtime_text(self) -> str:
        """The config as the fused ops' ``config`` argument: self-contained (the table's entries inline, no
        path to read), compact, the same text in every process for the same config."""
        text = self.__dict__.get("_runtime_text")
        if text is None:
            values = self.to_dict()
            values["threshold_table"] = None if self._table is None else self._table.to_dict()
            text = json.dumps(values, sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_runtime_text", text)
        return text

    @staticmethod
    def from_runtime_text(text: str) -> "PassConfig":
        """The config a compiled graph's ``runtime_text()`` stands for (parsed once per text)."""
        return _from_runtime_text(text)


@functools.lru_cache(maxsize=64)
def _from_runtime_text(text: str) -> PassConfig:
    try:
        values = json.loads(text)
        table = values.pop("threshold_table")
        config = PassConfig.from_dict(values)
        if table is not None:
            object.__setattr__(config, "_table", thresholds.parse(table))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"not an fcpass runtime config text ({exc}): {text[:200]!r}") from None
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
