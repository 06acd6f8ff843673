"""The tests' shared ranks (tests/support/multirank.py): one spawn per group, failures stay with their own body."""

import pytest

from support import multirank


def body_ok(rank, world_size, value):
    import fcpass

    fcpass.configure(fcpass.PassConfig(threshold_tokens=7))  # the next body must not see this
    return (rank, world_size, value)


def body_fails(rank, world_size):
    raise ValueError("body_fails broke")


def body_after(rank, world_size):
    return "ran"


def body_sees_runtime_config(rank, world_size):
    import fcpass

    return fcpass.runtime_config().threshold_tokens


# One rank: a group of its own (no other test registers world_size=1).
OK = multirank.shared(body_ok, "v", world_size=1, timeout=60)
SEES_CONFIG = multirank.shared(body_sees_runtime_config, world_size=1, timeout=60)
FAILS = multirank.shared(body_fails, world_size=1, timeout=60)
AFTER = multirank.shared(body_after, world_size=1, timeout=60)


def test_each_body_gets_its_own_results_and_a_fresh_runtime_config():
    assert OK() == [(0, 1, "v")]
    assert SEES_CONFIG() == [None]


def test_a_failing_body_fails_its_readers_and_the_bodies_after_it_do_not_run():
    with pytest.raises(RuntimeError, match="body_fails broke"):
        FAILS()
    with pytest.raises(RuntimeError, match="body_after did not run: a body before it"):
        AFTER()
    assert OK() == [(0, 1, "v")]  # already run: unaffected


def test_registering_after_the_group_ran_is_refused():
    OK()
    with pytest.raises(RuntimeError, match="registered after its ranks ran"):
        multirank.shared(body_after, world_size=1)
