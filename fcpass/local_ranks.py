"""Run a function on N real local ranks (gloo on 127.0.0.1) and collect results.

Used by ``python -m fcpass.replay --numerics`` (installed with fcpass) and, through devtools.launch, by the
demo, the benchmarks and the tests. Every run has a deadline: a
hung collective becomes a TimeoutError naming the ranks that did not answer,
and all ranks are killed.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import multiprocessing as mp
import queue
import socket
import time
import traceback

import torch

DEFAULT_TIMEOUT_S = 180.0
# Collective timeout inside the ranks: shorter than the run's deadline, so a
# protocol mismatch surfaces as an error from gloo rather than a kill.
COLLECTIVE_TIMEOUT_S = 60


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (all held open while choosing, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S, backend: str = "gloo", setup=None):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; list of results by rank.

    ``setup()`` (module-level, picklable) runs in each rank before the
    process group is created (the NPU stand-in registers itself there).
    """
    ctx = mp.get_context("spawn")
    results: queue.Queue = ctx.Queue()
    (port,) = free_ports(1)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, backend, setup, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes and p.exitcode]
                if dead:
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                continue
            outcomes[rank] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: payload for r, (status, payload) in outcomes.items() if status == "error"}
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [outcomes[r][1] for r in range(world_size)]


def _rank_main(fn, rank, world_size, port, backend, setup, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if setup is not None:
            setup()
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        payload = fn(rank, world_size, *args)
        results.put((rank, "ok", payload))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class ByValueTensor(torch.Tensor):
    """A tensor that pickles by value, so it survives the trip from a rank back to run_ranks' caller.

    torch.multiprocessing sends plain tensors through a queue as shared-memory
    file descriptors served by the sending process; a rank returns its result
    and exits, so the caller can find the sender gone (``FileNotFoundError``
    in ``rebuild_storage_fd``). This subclass pickles as ``torch.save`` bytes
    and arrives as a plain ``torch.Tensor``. In the rank it is a tensor.
    """

    def __reduce_ex__(self, protocol):
        buffer = io.BytesIO()
        torch.save(self.as_subclass(torch.Tensor).detach().clone(), buffer)
        return (_tensor_from_bytes, (buffer.getvalue(),))


def _tensor_from_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)


def by_value(tensor):
    """``tensor`` as a :class:`ByValueTensor` (safe to return from a rank)."""
    return tensor.detach().clone().as_subclass(ByValueTensor)
