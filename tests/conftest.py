import os
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(__file__)
sys.path.insert(0, TESTS_DIR)  # multirank, cases: picklable by module name in spawned ranks

# The compile caches stay on, as users have them; the session gets its own cache dirs (Inductor's, and vLLM's,
# which holds its AOT-compiled models and moves Inductor's inside), shared by every process it starts (as all
# processes of a machine share the default ones), so each run starts cold and leaves the user's caches alone.
_CACHES = tempfile.mkdtemp(prefix="fcpass-tests-caches-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHES, "inductor")
os.environ["VLLM_CACHE_ROOT"] = os.path.join(_CACHES, "vllm")


def pytest_collection_finish(session):
    """The shared ranks run only the bodies the selected tests read (-k, -m, node ids)."""
    from support import multirank

    multirank.select_tests(session.items)


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """The python of a virtualenv with fcpass's wheel installed, as a user has it (tests/support/wheel.py): built
    once per session, for every test that runs fcpass from it."""
    from support import wheel

    tmp = tmp_path_factory.mktemp("installed-wheel")
    return wheel.installed(tmp / "user-venv", wheel.build(tmp / "wheel"))
