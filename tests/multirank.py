"""The tests' name for fcpass.launch (ranks must import rank bodies by module name), and batched runs."""

from fcpass.launch import free_port, run_ranks  # noqa: F401


def run_batch(cases: dict, world_size: int, **run_ranks_kwargs) -> dict:
    """Run several rank bodies in one set of ranks: ``cases`` maps a name to ``(fn, args)``.

    Returns {name: [result of rank 0, rank 1, ...]}. One spawn instead of one
    per case: starting ranks (importing torch) costs more than most cases.
    """
    per_rank = run_ranks(_run_each, world_size, cases, **run_ranks_kwargs)
    return {name: [results[name] for results in per_rank] for name in cases}


def _run_each(rank, world_size, cases):
    return {name: fn(rank, world_size, *args) for name, (fn, args) in cases.items()}
