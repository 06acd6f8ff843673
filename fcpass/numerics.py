"""``python -m fcpass.replay DIR --numerics``: every fused site of the replayed graphs run here, on local gloo
ranks of the captured world size, with seeded random inputs of the site's shapes.

Each site (a fused op node of a rewritten graph; rank r runs rank r's capture
of it, bias and all) is called at two token counts, one at or below its
threshold and one above, and compared with the site's own ops (the op's
unfused path, which runs the graph's collective and matmul: issue 28, and
``tests/integration/test_below_threshold.py`` against the graph compiled
without fcpass): at or below, the same bits and the unfused path taken; above,
the fused path taken and the largest difference within the dtype's tolerance.
A site whose ops have no kernel here (vLLM's collectives need vLLM's groups,
NPU ops torch_npu, vLLM's oneDNN matmul vLLM's CPU build) is listed with the
reason.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.fx as fx

from fcpass import sites
from fcpass.local_ranks import run_ranks

# The threshold numerics uses where the config gives none (the backend's default may never fuse on CPU).
DEFAULT_THRESHOLD = 16
NEVER = 1 << 30
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # max |got - want| / max |want|
RUNNABLE_MATMULS = frozenset({"mm", "addmm", "linear", "onednn_mm"})


def check(results, threshold: int | None = None) -> dict[str, list[str]]:
    """{capture folder name: lines} for every fused site of ``results`` (``fcpass.testing.replay``'s), run on
    local ranks; a line starting with "FAILED" is a site whose numbers or path are wrong."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    compiles: dict[tuple, dict[int, object]] = {}
    for result in results:
        compiles.setdefault((result.capture.graph_number, result.capture.world_size), {})[result.capture.rank] = result
    lines: dict[str, list[str]] = {result.capture.folder.name: [] for result in results}
    for (_, world_size), by_rank in sorted(compiles.items()):
        per_rank = {rank: _site_specs(result.rewritten.graph, threshold, world_size)
                    for rank, result in by_rank.items()}
        if sorted(per_rank) != list(range(world_size)):
            for result in by_rank.values():
                lines[result.capture.folder.name].append(f"not run: captures of ranks {sorted(per_rank)} of "
                                                         f"{world_size} (every rank's is needed)")
            continue
        runnable = [i for i, (_, reason) in enumerate(per_rank[0]) if reason is None]
        for rank, result in by_rank.items():
            lines[result.capture.folder.name] += [f"{per_rank[rank][i][0]['name']}: not run: {reason}"
                                                  for i, (_, reason) in enumerate(per_rank[rank]) if reason]
        if not runnable:
            continue
        specs = [[per_rank[rank][i][0] for i in runnable] for rank in range(world_size)]
        outcomes = run_ranks(_run_sites, world_size, specs, threshold, timeout=600)
        for rank, result in by_rank.items():
            lines[result.capture.folder.name] += outcomes[rank]
    return lines


# --------------------------------------------------------------------------- the sites, from the graph

def _site_specs(graph: fx.Graph, threshold: int, world_size: int) -> list[tuple[dict, str | None]]:
    """(spec, why it cannot run here or None) per fused op node, in graph order: the op, and its arguments
    with every symbolic size made concrete at a token count below and above ``threshold``."""
    specs = []
    for node in graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "fcpass" \
                or "site" not in node.kwargs:
            continue
        op = node.target._opname
        site = sites.parse(op, node.kwargs["site"])
        spec = {"name": f"{op} #{len(specs)}", "op": op}
        reason = _why_not_here(site)
        if reason is None:
            counts = _token_counts(threshold, world_size)
            spec["calls"] = {tokens: _concrete((node.args, node.kwargs), node.args[0], tokens) for tokens in counts}
            spec["onednn"] = op.endswith("onednn") or op.endswith("onednn_mm")
        specs.append((spec, reason))
    return specs


def _why_not_here(site: sites.Site) -> str | None:
    if site.collective != sites.C10D_FUNCTIONAL:
        return f"its collective is {site.collective}'s (its library's process runs it, not local gloo ranks)"
    other = [form for form in site.matmuls if form not in RUNNABLE_MATMULS]
    if other:
        return f"no CPU kernel here for {other[0]}"
    if "onednn_mm" in site.matmuls and importlib.util.find_spec("vllm") is None:
        return "onednn_mm is vLLM's CPU kernel, and vLLM is not installed here"
    return None


def _token_counts(threshold: int, world_size: int) -> tuple[int, int]:
    """A token count at or below the threshold and one above it, multiples of the world size."""
    below = max(world_size, threshold - threshold % world_size)
    return below, 4 * max(threshold, world_size) + world_size


def _concrete(value, x: fx.Node, tokens: int):
    """``value`` (a node's arguments) with each node's fake value made concrete: the token symbol (the free
    symbol of x's rows) at ``tokens``, other symbols at their traced values."""
    rows = x.meta["val"].shape[0]
    token_symbols = rows.node.expr.free_symbols if isinstance(rows, torch.SymInt) else set()

    def size(s):
        if not isinstance(s, torch.SymInt):
            return int(s)
        expr = s.node.expr
        hints = s.node.shape_env.var_to_val
        return int(expr.xreplace({sym: (tokens if sym in token_symbols else hints[sym]) for sym in expr.free_symbols}))

    def one(v):
        if isinstance(v, fx.Node):
            v = v.meta["val"]
        if isinstance(v, torch.Tensor):
            return ("tensor", [size(s) for s in v.shape], v.dtype)
        if isinstance(v, torch.SymInt):
            return size(v)
        if isinstance(v, (list, tuple)):
            return type(v)(one(item) for item in v)
        if isinstance(v, dict):
            return {key: one(item) for key, item in v.items()}
        return v

    return one(value)


# --------------------------------------------------------------------------- in the ranks

def _run_sites(rank: int, world_size: int, specs_per_rank: list, threshold: int) -> list[str]:
    import torch.distributed as dist

    import fcpass

    torch.manual_seed(rank)
    group_name = dist.group.WORLD.group_name
    lines = []
    for spec in specs_per_rank[rank]:
        op = getattr(torch.ops.fcpass, spec["op"]).default
        for tokens, (args, kwargs) in spec["calls"].items():
            generator = torch.Generator().manual_seed(1_000_003 * rank + tokens)
            args = _materialize(args, generator, spec["onednn"])
            kwargs = {**_materialize(kwargs, generator, False), "group_name": group_name}
            fcpass.reset_decision_counts()
            got = op(*args, **{**kwargs, "threshold_tokens": threshold})
            paths = {path for (_, path, _) in fcpass.decision_counts()}
            want = op(*args, **{**kwargs, "threshold_tokens": NEVER})  # the site's own collective and matmul
            lines.append(_verdict(spec["name"], tokens, tokens <= threshold, paths, got, want))
    return lines


def _verdict(name: str, tokens: int, below: bool, paths: set, got, want) -> str:
    got, want = _tensors(got), _tensors(want)
    path = "unfused" if below else "fused"
    head = f"{name}, {tokens} tokens ({path} expected, {'/'.join(sorted(paths))} taken)"
    if paths != {path}:
        return f"FAILED {head}"
    if below:
        same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        return f"{'ok' if same else 'FAILED'} {head}: {'the same bits' if same else 'other bits'}"
    error = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for a, b in zip(got, want, strict=True))
    tolerance = TOLERANCE.get(want[-1].dtype, 2e-2)
    return f"{'ok' if error <= tolerance else 'FAILED'} {head}: relative error {error:.2e} (tolerance {tolerance:.0e})"


def _tensors(value) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _materialize(value, generator: torch.Generator, onednn: bool):
    """Random tensors for the specs of ``value``; for a oneDNN op, its (handler, n) pairs built by vLLM from a
    random (n, k) weight."""
    if onednn:
        x, handlers, ns, *rest = value
        (_, (_, k), dtype) = x
        packed = [_handler(n, k, dtype, generator) for n in ns] if isinstance(ns, list) else \
            _handler(ns, k, dtype, generator)
        return (_materialize(x, generator, False), packed, ns, *_materialize(tuple(rest), generator, False))
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "tensor":
        _, shape, dtype = value
        if dtype in (torch.int8, torch.int32, torch.int64):
            return torch.randint(-8, 8, shape, generator=generator, dtype=dtype)
        return (torch.randn(shape, generator=generator) / max(1, shape[-1]) ** 0.5).to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(item, generator, False) for item in value)
    if isinstance(value, dict):
        return {key: _materialize(item, generator, False) for key, item in value.items()}
    return value


_PACKED: list = []  # vLLM's handler objects release their packed weight when collected: kept for the rank's life


def _handler(n: int, k: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """The handler tensor of vLLM's oneDNN packing of a random (n, k) weight, as vLLM packs a linear's weight
    when it loads."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    try:
        from vllm._cpu_ops import create_onednn_mm  # vLLM 0.34
    except ImportError:
        from vllm._custom_ops import create_onednn_mm
    weight = (torch.randn(n, k, generator=generator) / k ** 0.5).to(dtype)
    _PACKED.append(create_onednn_mm(weight.t(), 32))
    return _PACKED[-1].handler_tensor
