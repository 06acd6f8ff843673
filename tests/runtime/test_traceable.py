"""fcpass.traceable on real gloo ranks: torch.compile's trace of ``dist.all_to_all_single`` into a receive buffer
of another rank (vllm-ascend's FlashComm2 o_proj sends 2-D into 1-D), with torch's own remap and with fcpass's.

Runs on every stack's torch: the main one's, the newest vLLM's (2.14) and the Ascend stacks' (2.10, vllm-ascend's pin),
as each torch names its own remap differently.
"""

import contextlib
import logging

import torch
import torch.distributed as dist

from support.multirank import shared

ROWS, WIDTH = 8, 3


def _send_2d_receive_1d(x):
    received = torch.empty(x.numel(), dtype=x.dtype)
    dist.all_to_all_single(received, x)
    return received * 1


def _same_shape(x):
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x)
    return received * 1


def _compiled(fn, graphs: list):
    """``fn`` compiled afresh, each graph Dynamo hands its backend recorded as its calls' targets, then run as is."""
    import torch._dynamo

    def recording(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method")])
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=recording, fullgraph=True)


@contextlib.contextmanager
def _warnings(logger_name: str):
    """The warnings ``logger_name`` logs inside the block, as a list of messages."""
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def _raised(call) -> str | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001  (torch's own trace failing is the finding)
        return f"{type(exc).__name__}: {exc}"
    return None


def run_remaps(rank, world_size):
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed import distributed_c10d

    from fcpass import traceable

    remaps, key = funcol.traceable_collective_remaps, distributed_c10d.all_to_all_single
    before = remaps[key]  # the shared ranks may have installed fcpass's already: put torch's back, then this
    # torch's own, by the name each torch gives it (2.10: all_to_all_inplace; 2.13: a wrapper calling it)
    torchs = before if before.__module__ == funcol.__name__ else getattr(
        funcol, "_remapped_all_to_all_single", funcol.all_to_all_inplace)
    x = torch.arange(ROWS * WIDTH, dtype=torch.float32).reshape(ROWS, WIDTH) + 100 * rank
    eager = _send_2d_receive_1d(x)
    results = {"eager": eager.tolist(), "x": x.flatten().tolist()}  # plain values: they cross the rank's queue
    try:
        remaps[key] = torchs
        graphs = {"torch": [], "fcpass": []}
        results["torch's trace"] = _raised(lambda: _compiled(_send_2d_receive_1d, [])(x))
        same_torch = _compiled(_same_shape, graphs["torch"])(x)
        results["installed"] = (traceable.install(), traceable.install())
        results["compiled"] = _compiled(_send_2d_receive_1d, graphs["fcpass"])(x).tolist()
        same_fcpass = _compiled(_same_shape, graphs["fcpass"])(x)
        results["same shape"] = {"bits": torch.equal(same_torch, same_fcpass), "graphs": graphs}
        foreign = lambda *args, **kwargs: None  # noqa: E731  (someone else's remap)
        remaps[key] = foreign
        with _warnings("fcpass.traceable") as said:
            results["beside another remap"] = (traceable.install(), traceable.install(), remaps[key] is foreign)
        results["said of it"] = said
    finally:
        remaps[key] = before
        torch._dynamo.reset()
    return results


REMAPS = shared(run_remaps, timeout=180)


def test_in_a_new_process_it_replaces_torchs_own_remap():
    """What vLLM's processes find: torch's own remap of this torch, taken without a warning."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from torch.distributed import _functional_collectives as funcol, distributed_c10d\n"
            "from fcpass import traceable\n"
            "torchs = funcol.traceable_collective_remaps[distributed_c10d.all_to_all_single]\n"
            "print(torchs.__module__, traceable.install(), "
            "funcol.traceable_collective_remaps[distributed_c10d.all_to_all_single].__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fcpass" not in done.stderr, done.stderr
    assert done.stdout.split() == ["torch.distributed._functional_collectives", "True", "fcpass_all_to_all_inplace"]


def test_torchs_own_trace_fails_at_the_copy():
    """Why fcpass carries the remap: a torch that traces this turns this red, and the module can go."""
    for r in REMAPS():
        error = r["torch's trace"]
        assert error is not None and error.startswith("TorchRuntimeError") and "copy_" in error, error


def test_fcpasss_trace_gives_eager_torchs_bits():
    per_rank = REMAPS()
    for rank, r in enumerate(per_rank):
        assert r["installed"] == (True, True)
        chunk = ROWS * WIDTH // len(per_rank)  # every rank's flat chunk for this one, in rank order
        expected = [value for other in per_rank for value in other["x"][rank * chunk:(rank + 1) * chunk]]
        assert r["eager"] == expected
        assert r["compiled"] == r["eager"]  # exact: the same values moved, nothing computed


def test_a_buffer_of_the_send_buffers_shape_traces_as_torch_traces_it():
    for r in REMAPS():
        same = r["same shape"]
        graph_torch, graph_fcpass = same["graphs"]["torch"], same["graphs"]["fcpass"][1:]  # after the 2-D -> 1-D
        assert same["bits"] and graph_fcpass == graph_torch, same
        assert any("all_to_all_single" in target for target in graph_torch[0]), graph_torch


def test_another_remap_is_left_alone_saying_so_once():
    for r in REMAPS():
        assert r["beside another remap"] == (False, False, True)
        assert len(r["said of it"]) == 1 and "not torch's own" in r["said of it"][0], r["said of it"]
