"""A measured threshold table: load it, validate it, look a shape up in it.

One backend's fusion crossover depends on the shape, so a single
``threshold_tokens`` is a compromise; ``python -m fcpass.calibrate`` measures
it per shape and writes this table, and ``PassConfig(threshold_table=path)``
puts it between the config's own threshold and the backend's fixed default.

Format (JSON)::

    {
      "format": "fcpass-thresholds/1",
      "backend": "generic",
      "measured": {...},                       # optional, free-form provenance
      "entries": [
        {"op": "mm_reduce_scatter",            # or "all_gather_mm", "mm_all_reduce"
         "world_size": 2,
         "dtype": "float32",                   # torch dtype name of the op's input x
         "k_log2": 10, "n_log2": 10,           # bucket: floor(log2(k)), floor(log2(n))
         "threshold_tokens": 512,              # fuse when tokens > threshold_tokens
         "pipeline_chunks": 4,                 # optional: measured best chunk count
         "measured": {...}}                    # optional, free-form provenance
      ]
    }

Nearby shapes share a bucket (k 1024..2047 all have k_log2 10), so a table
measured on a few shapes covers the model's. ``n`` is the op's total n (the
sum over an all_gather_mm's weights), as the guard sees it. ``backend`` is
the backend whose fused path was measured: the table is consulted only when
that backend runs the call (a gloo/CPU crossover says nothing about an NPU).
Every key of a bucket is equal on every rank, so the threshold looked up is
too (the guard's rule), given the same file on every rank: each process
loads the path itself, and the content digest in ``PassConfig.key()`` tells
two contents apart. A table is parsed once per content (cached by
digest), and a config keeps the table it was built with, so a call never
reads the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fcpass.families import FAMILIES
from fcpass.limits import MAX_PIPELINE_CHUNKS, MAX_THRESHOLD_TOKENS, WORLD_SIZE_RANGE

FORMAT = "fcpass-thresholds/1"
OPS = tuple(FAMILIES)  # a table entry's "op" is its family
# A log2 bucket above 40 would mean a dimension of 2**40: a typo, not a shape.
MAX_LOG2 = 40
_TOP_KEYS = {"format", "backend", "entries", "measured"}
_ENTRY_REQUIRED = {"op", "world_size", "dtype", "k_log2", "n_log2", "threshold_tokens"}
_ENTRY_OPTIONAL = {"pipeline_chunks", "measured"}


class ThresholdTableError(ValueError):
    """A table that cannot be used; the message names the file and the entry."""


def bucket(dim: int) -> int:
    """floor(log2(dim)): the bucket of a k or an n."""
    if dim < 1:
        raise ValueError(f"a matmul dimension must be >= 1, got {dim}")
    return dim.bit_length() - 1


@dataclass(frozen=True)
class Entry:
    threshold_tokens: int
    pipeline_chunks: int | None = None


# (op, world_size, dtype name, k_log2, n_log2)
BucketKey = tuple[str, int, str, int, int]


class ThresholdTable:
    """The validated entries of one table file; lookups are memoized per exact shape."""

    def __init__(self, backend: str, entries: Mapping[BucketKey, Entry], digest: str) -> None:
        self.backend = backend
        self.entries = dict(entries)
        self.digest = digest
        self._memo: dict[tuple, Entry | None] = {}

    def lookup(self, backend: str, op: str, world_size: int, dtype: torch.dtype, k: int, n: int) -> Entry | None:
        """The entry of this call's bucket, or None (wrong backend, or no entry)."""
        memo_key = (backend, op, world_size, dtype, k, n)
        try:
            return self._memo[memo_key]
        except KeyError:
            pass
        entry = None
        if backend == self.backend and k >= 1 and n >= 1:
            entry = self.entries.get((op, world_size, dtype_name(dtype), bucket(k), bucket(n)))
        self._memo[memo_key] = entry
        return entry

    def to_dict(self) -> dict[str, Any]:
        """The entries in the file's format, without provenance: what a compiled graph carries (see
        ``PassConfig.runtime_text``); :func:`parse` reads it back."""
        entries = []
        for (op, world_size, dtype, k_log2, n_log2), entry in sorted(self.entries.items()):
            raw = {"op": op, "world_size": world_size, "dtype": dtype, "k_log2": k_log2, "n_log2": n_log2,
                   "threshold_tokens": entry.threshold_tokens}
            if entry.pipeline_chunks is not None:
                raw["pipeline_chunks"] = entry.pipeline_chunks
            entries.append(raw)
        return table_dict(self.backend, entries)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the table's spelling."""
    return str(dtype).removeprefix("torch.")


def load(path: str) -> ThresholdTable:
    """Read and validate the table at ``path``; a ThresholdTableError says what is wrong."""
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        raise ThresholdTableError(f"{path}: no such file") from None
    except OSError as exc:
        raise ThresholdTableError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return _parse(content)
    except ThresholdTableError as exc:
        raise ThresholdTableError(f"{path}: {exc}") from None


def parse(data: Mapping[str, Any]) -> ThresholdTable:
    """A table from its dict form (:meth:`ThresholdTable.to_dict`), validated as a file is."""
    return _parse(json.dumps(data, sort_keys=True).encode())


@functools.lru_cache(maxsize=32)
def _parse(content: bytes) -> ThresholdTable:
    """Parsed once per content: configs are built often (every process, every from_dict)."""
    try:
        data = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ThresholdTableError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ThresholdTableError(f"the top level must be a JSON object, got {type(data).__name__}")
    _check_keys("the table", data, required={"format", "backend", "entries"}, allowed=_TOP_KEYS)
    if data["format"] != FORMAT:
        raise ThresholdTableError(f"format must be {FORMAT!r}, got {data['format']!r}")
    backend = data["backend"]
    if not isinstance(backend, str) or not backend:
        raise ThresholdTableError(f"backend must be a backend name like 'generic', got {backend!r}")
    if not isinstance(data["entries"], list):
        raise ThresholdTableError(f"entries must be a list, got {type(data['entries']).__name__}")
    entries: dict[BucketKey, Entry] = {}
    for index, raw in enumerate(data["entries"]):
        key, entry = _parse_entry(index, raw)
        if key in entries:
            raise ThresholdTableError(f"entry {index}: duplicate bucket {_describe(key)}")
        entries[key] = entry
    return ThresholdTable(backend, entries, hashlib.sha256(content).hexdigest())


def _parse_entry(index: int, raw: Any) -> tuple[BucketKey, Entry]:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise ThresholdTableError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    _check_keys(where, raw, required=_ENTRY_REQUIRED, allowed=_ENTRY_REQUIRED | _ENTRY_OPTIONAL)
    if raw["op"] not in OPS:
        raise ThresholdTableError(f"{where}: op must be one of {OPS}, got {raw['op']!r}")
    _check_int(where, raw, "world_size", *WORLD_SIZE_RANGE)
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ThresholdTableError(f"{where}: dtype must be a torch dtype name like 'bfloat16', got {dtype!r}")
    _check_int(where, raw, "k_log2", 0, MAX_LOG2)
    _check_int(where, raw, "n_log2", 0, MAX_LOG2)
    _check_int(where, raw, "threshold_tokens", 0, MAX_THRESHOLD_TOKENS)
    if "pipeline_chunks" in raw:
        _check_int(where, raw, "pipeline_chunks", 1, MAX_PIPELINE_CHUNKS)
    key = (raw["op"], raw["world_size"], dtype, raw["k_log2"], raw["n_log2"])
    return key, Entry(raw["threshold_tokens"], raw.get("pipeline_chunks"))


def _check_keys(where: str, raw: dict, required: set[str], allowed: set[str]) -> None:
    missing = sorted(required - set(raw))
    if missing:
        raise ThresholdTableError(f"{where}: missing key(s) {missing}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ThresholdTableError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_int(where: str, raw: dict, key: str, lo: int, hi: int) -> None:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ThresholdTableError(f"{where}: {key} must be an int in [{lo}, {hi}], got {value!r}")


def _describe(key: BucketKey) -> str:
    op, world_size, dtype, k_log2, n_log2 = key
    return (f"{op} world_size={world_size} {dtype} k in [{2**k_log2}, {2**(k_log2 + 1)}) "
            f"n in [{2**n_log2}, {2**(n_log2 + 1)})")


def entry_dict(op: str, world_size: int, dtype: torch.dtype | str, k: int, n: int, threshold_tokens: int,
               pipeline_chunks: int | None = None, measured: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One entry for the shape (k, n), in the file's format (what calibrate writes)."""
    entry: dict[str, Any] = {
        "op": op, "world_size": world_size, "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
        "k_log2": bucket(k), "n_log2": bucket(n), "threshold_tokens": threshold_tokens,
    }
    if pipeline_chunks is not None:
        entry["pipeline_chunks"] = pipeline_chunks
    if measured is not None:
        entry["measured"] = dict(measured)
    return entry


def table_dict(backend: str, entries: list[dict[str, Any]], measured: Mapping[str, Any] | None = None) -> dict:
    table: dict[str, Any] = {"format": FORMAT, "backend": backend, "entries": entries}
    if measured is not None:
        table["measured"] = dict(measured)
    return table


__all__ = ["Entry", "FORMAT", "ThresholdTable", "ThresholdTableError", "bucket", "dtype_name", "entry_dict",
           "load", "parse", "table_dict"]
