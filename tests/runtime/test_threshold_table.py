"""The measured threshold table: format validation, bucket lookup, precedence in the ops, the cache key."""

import copy
import json
import pathlib
import pickle

import pytest
import torch
import torch.distributed as dist

import fcpass
from fcpass import dispatch, thresholds
from fcpass.backends import get_backend
from fcpass.backends.base import ALL_GATHER_MM, MM_ALL_REDUCE, MM_REDUCE_SCATTER
from fcpass.guard import GuardFacts
from support.multirank import shared

GENERIC = get_backend("generic")


def _entry(**overrides):
    values = dict(op="mm_reduce_scatter", world_size=2, dtype="float32", k_log2=10, n_log2=10,
                  threshold_tokens=512, pipeline_chunks=4)
    values.update(overrides)
    return values


def _table(*entries, **top):
    values = {"format": thresholds.FORMAT, "backend": "generic",
              "entries": list(entries) or [_entry(), _entry(op="all_gather_mm", threshold_tokens=8192)]}
    values.update(top)
    return values


def _write(tmp_path, content, name="thresholds.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _facts(op="mm_reduce_scatter", num_tokens=1024, world_size=2, dtype=torch.float32, k=1024, n=1024):
    return GuardFacts(op=op, num_tokens=num_tokens, world_size=world_size, dtype=dtype, k=k, n=n, device_type="cpu")


def test_bucket_is_floor_log2():
    assert [thresholds.bucket(d) for d in (1, 2, 3, 1023, 1024, 2047, 2048)] == [0, 1, 1, 9, 10, 10, 11]
    with pytest.raises(ValueError):
        thresholds.bucket(0)


@pytest.mark.parametrize(
    "lookup, expected",
    [
        (dict(k=1024, n=1024), 512),
        (dict(k=2047, n=1500), 512),  # same bucket: nearby shapes share the entry
        (dict(k=2048, n=1024), None),
        (dict(k=1024, n=512), None),
        (dict(k=1024, n=1024, world_size=4), None),
        (dict(k=1024, n=1024, dtype=torch.bfloat16), None),
        (dict(k=1024, n=1024, op="all_gather_mm"), 8192),
        (dict(k=1024, n=1024, backend="npu"), None),  # measured on another backend: not consulted
    ],
)
def test_lookup_by_bucket(tmp_path, lookup, expected):
    table = thresholds.load(_write(tmp_path, _table()))
    args = dict(backend="generic", op="mm_reduce_scatter", world_size=2, dtype=torch.float32)
    args.update(lookup)
    entry = table.lookup(**args)
    assert (entry.threshold_tokens if entry else None) == expected


def test_precedence(tmp_path):
    path = _write(tmp_path, _table())
    table_only = fcpass.PassConfig(threshold_table=path)
    both = fcpass.PassConfig(threshold_table=path, threshold_tokens=100)
    resolve = dispatch._resolve_threshold
    assert resolve(7, both, GENERIC, MM_REDUCE_SCATTER, _facts()) == 7  # the op's own
    assert resolve(0, both, GENERIC, MM_REDUCE_SCATTER, _facts()) == 0
    assert resolve(-1, both, GENERIC, MM_REDUCE_SCATTER, _facts()) == 100  # the config's
    assert resolve(-1, table_only, GENERIC, MM_REDUCE_SCATTER, _facts()) == 512  # the table's bucket
    assert resolve(-1, table_only, GENERIC, ALL_GATHER_MM, _facts(op="all_gather_mm")) == 8192
    # No bucket, another backend, or no table: the backend's default.
    default = GENERIC.default_threshold(MM_REDUCE_SCATTER, _facts())
    assert resolve(-1, table_only, GENERIC, MM_REDUCE_SCATTER, _facts(k=4096)) == default
    npu = get_backend("npu")
    assert resolve(-1, table_only, npu, MM_REDUCE_SCATTER, _facts()) == npu.default_threshold_tokens
    assert resolve(-1, fcpass.PassConfig(), GENERIC, MM_REDUCE_SCATTER, _facts()) == default
    assert resolve(-1, table_only, None, MM_REDUCE_SCATTER, _facts()) == 0  # backend off


def test_generic_default_threshold_by_family_and_transport():
    """CPU (gloo, exchange): mm_reduce_scatter fuses from a lower count than all_gather_mm; device groups
    (per-chunk collectives) keep the collective pipeline's 2048."""
    cpu_rs, cpu_ag = _facts(), _facts(op="all_gather_mm")
    cuda_rs = cpu_rs._replace(device_type="cuda")
    assert GENERIC.default_threshold(MM_REDUCE_SCATTER, cpu_rs) == 512
    assert GENERIC.default_threshold(ALL_GATHER_MM, cpu_ag) == 2048
    assert GENERIC.default_threshold(MM_REDUCE_SCATTER, cuda_rs) == 2048
    assert dispatch._resolve_threshold(-1, fcpass.PassConfig(), GENERIC, MM_REDUCE_SCATTER, cpu_rs) == 512


def test_table_chunks_only_where_config_leaves_them_open(tmp_path):
    path = _write(tmp_path, _table(_entry(), _entry(k_log2=11)))
    del_chunks = _table(_entry(k_log2=11))
    del del_chunks["entries"][0]["pipeline_chunks"]
    no_chunks = _write(tmp_path, del_chunks, "no_chunks.json")
    chunks = lambda config, **f: dispatch._table_chunks(config, GENERIC, MM_REDUCE_SCATTER, _facts(**f))  # noqa: E731
    assert chunks(fcpass.PassConfig(threshold_table=path)) == 4
    assert chunks(fcpass.PassConfig(threshold_table=path, pipeline_chunks=2)) == 2  # the config's own
    assert chunks(fcpass.PassConfig(threshold_table=path), k=8192) == 0  # no bucket: the backend's choice
    assert chunks(fcpass.PassConfig(threshold_table=no_chunks), k=2048) == 0  # bucket without chunks


def test_loaded_once_not_per_call(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_table()))
    config = fcpass.PassConfig(threshold_table=str(path))
    path.unlink()  # a lookup never reads the file again
    assert dispatch._resolve_threshold(-1, config, GENERIC, MM_REDUCE_SCATTER, _facts()) == 512
    path.write_text(json.dumps(_table()))
    assert fcpass.PassConfig(threshold_table=str(path)).table() is config.table()  # parsed once per content


def test_key_follows_content(tmp_path):
    path = _write(tmp_path, _table())
    first = fcpass.PassConfig(threshold_table=path)
    assert fcpass.PassConfig(threshold_table=path).key() == first.key()
    _write(tmp_path, _table(_entry(threshold_tokens=1024)))
    second = fcpass.PassConfig(threshold_table=path)
    assert second.key() != first.key() and second != first
    assert second.to_dict() == first.to_dict()  # the dict form is the path only
    assert fcpass.PassConfig().key() != first.key()


def test_dict_round_trip_and_copies(tmp_path):
    path = _write(tmp_path, _table())
    config = fcpass.PassConfig(threshold_table=path, pipeline_chunks=2)
    values = json.loads(json.dumps(config.to_dict()))  # plain JSON, as --additional-config carries it
    assert values["threshold_table"] == path
    again = fcpass.PassConfig.from_dict(values)
    assert again == config and again.key() == config.key()
    for copied in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert copied == config and copied.table().digest == config.table().digest
    assert fcpass.PassConfig.from_dict({}).table() is None


def _without(key):
    entry = _entry()
    del entry[key]
    return entry


BAD_TABLES = [
    ("{not json", "not valid JSON"),
    ([1, 2], "top level must be a JSON object"),
    (_table(format="fcpass-thresholds/0"), "format must be"),
    ({"format": thresholds.FORMAT, "entries": []}, r"missing key\(s\) \['backend'\]"),
    (_table(extra=1), r"unknown key\(s\) \['extra'\]"),
    (_table(backend=""), "backend must be"),
    (_table(entries={}), "entries must be a list"),
    (_table("x"), "entry 0: must be a JSON object"),
    (_table(_without("threshold_tokens")), r"entry 0: missing key\(s\) \['threshold_tokens'\]"),
    (_table(_entry(chunks=4)), r"entry 0: unknown key\(s\) \['chunks'\]"),
    (_table(_entry(op="matmul")), "entry 0: op must be one of"),
    (_table(_entry(world_size=1)), "entry 0: world_size must be an int"),
    (_table(_entry(world_size="2")), "entry 0: world_size must be an int"),
    (_table(_entry(dtype="float33")), "entry 0: dtype must be a torch dtype name"),
    (_table(_entry(dtype="Tensor")), "entry 0: dtype must be a torch dtype name"),
    (_table(_entry(k_log2=-1)), "entry 0: k_log2 must be an int"),
    (_table(_entry(n_log2=1.5)), "entry 0: n_log2 must be an int"),
    (_table(_entry(threshold_tokens=-1)), "entry 0: threshold_tokens must be an int"),
    (_table(_entry(threshold_tokens=True)), "entry 0: threshold_tokens must be an int"),
    (_table(_entry(pipeline_chunks=0)), "entry 0: pipeline_chunks must be an int"),
    (_table(_entry(), _entry(threshold_tokens=1)), "entry 1: duplicate bucket mm_reduce_scatter world_size=2"),
]


@pytest.mark.parametrize("content, problem", BAD_TABLES)
def test_bad_table_is_a_clear_error(tmp_path, content, problem):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=f"PassConfig.threshold_table: .*{problem}") as info:
        fcpass.PassConfig(threshold_table=path)
    assert path in str(info.value)


@pytest.mark.parametrize(
    "value, problem",
    [("/nonexistent/thresholds.json", "no such file"), ("", "must be None or a file path"),
     (3, "must be None or a file path")],
)
def test_bad_path_is_a_clear_error(value, problem):
    with pytest.raises(ValueError, match=f"PassConfig.threshold_table.*{problem}"):
        fcpass.PassConfig(threshold_table=value)


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="PassConfig.threshold_table: .*cannot read it"):
        fcpass.PassConfig(threshold_table=str(tmp_path))


def _guarded_calls(rank, world_size, table):
    """Ops with threshold -1 on both sides of the table's thresholds; the decision and chunks of each."""
    import tempfile

    from fcpass.backends import generic

    requested = []
    auto_chunks = generic.auto_chunks
    generic.auto_chunks = lambda rows, chunks: requested.append(chunks) or auto_chunks(rows, chunks)
    name = dist.group.WORLD.group_name
    w = torch.randn(1024, 1024)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:  # each rank its own copy of the same table
            fcpass.configure(fcpass.PassConfig(threshold_table=_write(pathlib.Path(tmp), table)))
        for tokens in (512, 1024):
            fcpass.reset_decision_counts()
            requested.clear()
            x = torch.randn(tokens, 1024)
            out = torch.ops.fcpass.mm_reduce_scatter(x, w, None, name, world_size, -1)
            product = x @ w
            ref = torch.empty_like(out)
            dist.reduce_scatter_tensor(ref, product)
            (decision,) = fcpass.decision_counts()
            results.append((tokens, decision[1], list(requested), torch.allclose(out, ref, atol=1e-4)))
    finally:
        generic.auto_chunks = auto_chunks
    return results


GUARDED = shared(_guarded_calls, _table(_entry(threshold_tokens=512, pipeline_chunks=3)), timeout=120)


def test_guarded_op_takes_threshold_and_chunks_from_table():
    per_rank = GUARDED()
    assert per_rank[0] == per_rank[1]
    assert per_rank[0] == [(512, "unfused", [], True), (1024, "fused", [3], True)]


def test_cuda_takes_matmul_all_reduce_past_vllms_custom_all_reduce():
    """On CUDA vLLM's own all-reduce kernel serves every all_reduce up to 8 MiB: fcpass's NCCL pipeline starts
    where vLLM's transport is NCCL too (bf16: hidden 4096 -> 1024 tokens, 8192 -> 512 -> still 1024); the other
    families keep 1024."""
    cuda = get_backend("cuda")
    facts = _facts(op="mm_all_reduce", dtype=torch.bfloat16)._replace(device_type="cuda")
    assert cuda.default_threshold(MM_ALL_REDUCE, facts._replace(n=4096)) == 1024
    assert cuda.default_threshold(MM_ALL_REDUCE, facts._replace(n=2048)) == 2048
    assert cuda.default_threshold(MM_ALL_REDUCE, facts._replace(n=2048, dtype=torch.float32)) == 1024
    assert cuda.default_threshold(MM_ALL_REDUCE, facts._replace(n=1024, dtype=torch.int8)) == 4096
    assert cuda.default_threshold(MM_REDUCE_SCATTER, facts._replace(n=1024)) == 1024
