import os
import sys

TESTS_DIR = os.path.dirname(__file__)
sys.path.insert(0, TESTS_DIR)  # multirank, cases: picklable by module name in spawned ranks

os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
