"""The tests' shared ranks (tests/support/multirank.py): one spawn per group, failures stay with their own body."""

import os
import subprocess
import sys

import pytest

from support import multirank

RAN_LOG_ENV = "FCPASS_TEST_SHARED_RANKS_LOG"  # a file each body appends its name to (the selection test's)


def _log_ran(name: str) -> None:
    if os.environ.get(RAN_LOG_ENV):
        with open(os.environ[RAN_LOG_ENV], "a") as f:
            f.write(f"{name} {os.getpid()}\n")


def body_ok(rank, world_size, value):
    import fcpass

    _log_ran("body_ok")

    fcpass.configure(fcpass.PassConfig(threshold_tokens=7))  # the next body must not see this
    return (rank, world_size, value)


def body_fails(rank, world_size):
    _log_ran("body_fails")
    raise ValueError("body_fails broke")


def body_after(rank, world_size):
    _log_ran("body_after")
    return "ran"


def body_sees_eager_config(rank, world_size):
    import fcpass

    _log_ran("body_sees_eager_config")
    return fcpass.eager_config().threshold_tokens


def body_read_through_a_fixture(rank, world_size):
    _log_ran("body_read_through_a_fixture")
    return "through a fixture"


# One rank: a group of its own (no other test registers world_size=1).
OK = multirank.shared(body_ok, "v", world_size=1, timeout=60)
SEES_CONFIG = multirank.shared(body_sees_eager_config, world_size=1, timeout=60)
THROUGH_A_FIXTURE = multirank.shared(body_read_through_a_fixture, world_size=1, timeout=60)
FAILS = multirank.shared(body_fails, world_size=1, timeout=60)
AFTER = multirank.shared(body_after, world_size=1, timeout=60)


def test_each_body_gets_its_own_results_and_a_fresh_eager_config():
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


@pytest.fixture
def fixture_results():
    return _results_through_a_helper()


def _results_through_a_helper():
    return THROUGH_A_FIXTURE()


def test_a_body_read_through_a_fixture_and_a_helper(fixture_results):
    assert fixture_results == ["through a fixture"]


def test_k_runs_only_the_bodies_of_the_selected_tests_in_one_spawn(tmp_path):
    """``-k`` selects the bodies its tests read (directly, through fixtures and module functions), all of them in
    one spawn, and no other body."""
    log = tmp_path / "ran.txt"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "fresh_eager_config or through_a_fixture"], capture_output=True, text=True,
                         timeout=240, env={**os.environ, RAN_LOG_ENV: str(log)},
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = dict(line.split() for line in log.read_text().splitlines())
    assert sorted(ran) == ["body_ok", "body_read_through_a_fixture", "body_sees_eager_config"]
    assert len(set(ran.values())) == 1  # one process: every selected body was in the first spawn
