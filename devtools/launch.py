"""N real local ranks (gloo on 127.0.0.1): fcpass.local_ranks, which ships with fcpass (the replay's
``--numerics`` runs on it); the demo, the benchmarks and the tests import it from here."""

from fcpass.local_ranks import (COLLECTIVE_TIMEOUT_S, DEFAULT_TIMEOUT_S, ByValueTensor, by_value, free_ports,
                                run_ranks)

__all__ = ["COLLECTIVE_TIMEOUT_S", "DEFAULT_TIMEOUT_S", "ByValueTensor", "by_value", "free_ports", "run_ranks"]
