"""Bad input fails with an error naming the problem, on every rank, before any collective.

The fake-impl checks run under FakeTensorMode (no process group needed);
the runtime ones on real gloo ranks, where a hang would be caught by the
harness deadline.
"""

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import fcpass
from fcpass.validate import FusedOpInputError
from support.multirank import shared


def _rs(x, w, bias=None, world_size=2):
    return torch.ops.fcpass.mm_reduce_scatter(x, w, bias, "tp:0", world_size, 0)


def _sum(xs, ws):
    return torch.ops.fcpass.mm_sum_reduce_scatter(xs, ws, [None] * len(ws), "tp:0", 2, 0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _rs(torch.randn(8, 16), torch.randn(12, 4)), "k mismatch, x has k=16 but w has k=12"),
        (lambda: _rs(torch.randn(8, 16), torch.randn(16, 4, dtype=torch.bfloat16)), "dtype mismatch"),
        (lambda: _rs(torch.randn(8, 16, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)),
         "dtype torch.float64 not supported"),
        (lambda: _rs(torch.randn(7, 16), torch.randn(16, 4)), "token count 7 is not divisible by world_size 2"),
        (lambda: _rs(torch.randn(8, 16), torch.randn(16, 4), torch.randn(5)), r"bias must have shape \(4,\)"),
        (lambda: torch.ops.fcpass.mm_reduce_scatter(torch.randn(7, 16), torch.randn(16, 4), None, "tp:0", 2, 0, 2),
         "token count 9 is not divisible by world_size 2"),
        (lambda: torch.ops.fcpass.mm_reduce_scatter(torch.randn(8, 16), torch.randn(16, 4), None, "tp:0", 2, 0, -2),
         "pad_rows must be >= 0, got -2"),
        (lambda: _rs(torch.randn(8, 16), torch.randn(16, 4), world_size=0), "world_size must be >= 1"),
        (lambda: torch.ops.fcpass.all_gather_mm(torch.randn(3, 16), [torch.randn(16, 4)], [], "tp:0", 2, 0),
         "1 weights but 0 biases"),
        (lambda: torch.ops.fcpass.mm_reduce_scatter_scaled(
            torch.zeros(8, 16, dtype=torch.int8), torch.zeros(16, 4, dtype=torch.int8), None, torch.ones(4),
            torch.zeros(4), torch.bfloat16, "tp:0", 2, 0), "bias dtype must be torch.int32"),
        (lambda: torch.ops.fcpass.all_gather_scaled_mm(
            torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, 1), [torch.zeros(16, 4, dtype=torch.int8)],
            [torch.ones(4)], [None], torch.bfloat16, "tp:0", 2, 0), "x_scale must be per-tensor"),
        (lambda: _sum([torch.randn(8, 16)], [torch.randn(16, 4), torch.randn(8, 4)]), "2 weights but 1 xs"),
        (lambda: _sum([torch.randn(8, 16)], [torch.randn(16, 4)]), "a sum needs two or more products"),
        (lambda: _sum([torch.randn(8, 16), torch.randn(6, 8)], [torch.randn(16, 4), torch.randn(8, 4)]),
         r"product 1 is \(6, 4\) torch.float32, product 0 \(8, 4\)"),
        (lambda: _sum([torch.randn(8, 16), torch.randn(8, 8)], [torch.randn(16, 4), torch.randn(9, 4)]),
         "k mismatch, x has k=8 but w has k=9"),
    ],
)
def test_fake_impl_names_the_problem(make, message):
    with FakeTensorMode(), pytest.raises(FusedOpInputError, match=message):
        make()


def run_bad_calls(rank, world_size):
    name = dist.group.WORLD.group_name
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    calls = {
        "unknown_group": lambda: _rs_named(x, w, "no-such-group", world_size),
        "world_size_mismatch": lambda: _rs_named(x, w, name, world_size + 2),
        "tokens_not_divisible": lambda: _rs_named(torch.randn(7, 16), w, name, world_size),
        "one_token": lambda: _rs_named(torch.randn(1, 16), w, name, world_size),
        "k_mismatch": lambda: _rs_named(x, torch.randn(15, 4), name, world_size),
    }
    messages = {}
    for key, call in calls.items():
        try:
            call()
            messages[key] = None
        except (ValueError, RuntimeError) as exc:
            messages[key] = str(exc)
    dist.barrier()  # the group still works: nothing was left half-way in a collective
    return messages


def _rs_named(x, w, name, world_size):
    return torch.ops.fcpass.mm_reduce_scatter(x, w, None, name, world_size, 0)


BAD_CALLS = shared(run_bad_calls, timeout=120)


def test_runtime_errors_name_the_problem_without_hanging():
    per_rank = BAD_CALLS()
    expected = {
        "unknown_group": "unknown process group 'no-such-group'",
        "world_size_mismatch": "world_size 4 does not match group",
        "tokens_not_divisible": "token count 7 is not divisible by world_size 2",
        "one_token": "token count 1 is not divisible by world_size 2",
        "k_mismatch": "k mismatch",
    }
    for messages in per_rank:
        for key, text in expected.items():
            assert messages[key] is not None and text in messages[key], (key, messages[key])


def run_over_max_world_size(rank, world_size):
    from support.cases import Case
    from support.op_runs import run_cases

    return run_cases(rank, world_size, [Case(m=16, k=32, threshold=0)], [Case(m=4, k=32, threshold=0)],
                     fcpass.PassConfig(max_world_size=2))


OVER_MAX_WORLD_SIZE = shared(run_over_max_world_size, world_size=4, timeout=120)


def test_world_size_over_limit_falls_back_to_unfused():
    per_rank = OVER_MAX_WORLD_SIZE()
    for results in per_rank:
        for r in results:
            assert r["decision"][1:] == ("unfused", "world_size 4 > max_world_size 2")
            assert r["error"] <= 1e-5


def run_switched_off(rank, world_size):
    from support.cases import Case
    from support.op_runs import run_cases

    rs, ag = [Case(m=16, k=32, threshold=0)], [Case(m=4, k=32, threshold=0)]
    return (run_cases(rank, world_size, rs, ag, fcpass.PassConfig(fuse_mm_reduce_scatter=False))
            + run_cases(rank, world_size, rs, ag, fcpass.PassConfig(backend="off")))


SWITCHED_OFF = shared(run_switched_off, timeout=120)


def test_disabled_family_and_backend_off_run_unfused():
    for results in SWITCHED_OFF():
        assert [r["decision"][1:] for r in results] == [
            ("unfused", "family disabled (PassConfig flag off)"), ("fused", "tokens > threshold"),
            ("unfused", "backend off"), ("unfused", "backend off"),
        ]
        assert all(r["error"] <= 1e-5 for r in results)


def run_backward_through_the_ops(rank, world_size):
    """A gradient asked of an op (inference-only; its collectives have none): the error, on both families."""
    name = dist.group.WORLD.group_name
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 8)
    outputs = {
        "mm_reduce_scatter": torch.ops.fcpass.mm_reduce_scatter(x, w, None, name, world_size, 1 << 20),
        "all_gather_mm": torch.ops.fcpass.all_gather_mm(x, [w], [None], name, world_size, 1 << 20)[1][0],
    }
    messages = {}
    for op, out in outputs.items():
        try:
            out.sum().backward()
            messages[op] = None
        except RuntimeError as exc:
            messages[op] = str(exc)
    return messages


BACKWARD = shared(run_backward_through_the_ops, timeout=60)


def test_backward_through_an_op_is_an_error_naming_it():
    for messages in BACKWARD():
        for op, message in messages.items():
            assert message is not None and f"fcpass::{op} is inference-only" in message, (op, message)


def run_repeated_signatures(rank, world_size):
    """Calls that repeat a signature (planned once, then looked up): bad input, a new config and the
    decision counters behave as on a first call."""
    name = dist.group.WORLD.group_name
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    rs = lambda bias=None, x=x: torch.ops.fcpass.mm_reduce_scatter(x, w, bias, name, world_size, -1)  # noqa: E731
    found = {}
    fcpass.configure(fcpass.PassConfig(threshold_tokens=1 << 20))
    fcpass.reset_decision_counts()
    first = rs()
    found["same_result"] = all(torch.equal(rs(), first) for _ in range(3))
    fcpass.configure(fcpass.PassConfig(threshold_tokens=0))  # the same signature, now above the threshold
    rs()
    found["decisions"] = {path: count for (_, path, _), count in fcpass.decision_counts().items()}
    bad = {"bias_shape": lambda: rs(torch.randn(5)), "bias_dtype": lambda: rs(torch.randn(4, dtype=torch.bfloat16)),
           "tokens": lambda: rs(x=torch.randn(7, 16))}
    rs(torch.randn(4))  # a good call with a bias, planned, before the bad biases
    found["errors"] = {}
    for key, call in bad.items():
        for _ in range(2):  # a failing signature is never planned: the second call fails alike
            try:
                call()
                found["errors"].setdefault(key, []).append(None)
            except FusedOpInputError as exc:
                found["errors"].setdefault(key, []).append(str(exc))
    dist.barrier()
    return found


REPEATED = shared(run_repeated_signatures, timeout=60)


def test_a_repeated_signature_is_checked_and_decided_like_a_first_call():
    for found in REPEATED():
        assert found["same_result"]
        assert found["decisions"] == {"unfused": 4, "fused": 1}
        expected = {"bias_shape": r"bias must have shape (4,)", "bias_dtype": "bias dtype must be torch.float32",
                    "tokens": "token count 7 is not divisible by world_size 2"}
        for key, text in expected.items():
            messages = found["errors"][key]
            assert len(messages) == 2 and all(m is not None and text in m for m in messages), (key, messages)
