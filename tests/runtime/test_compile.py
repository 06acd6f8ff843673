"""torch.compile(fullgraph=True) over the ops: one compilation for every token count.

The guard lives inside the op, so crossing the threshold must not recompile.
Compilations are counted at the backend (every Dynamo graph goes through it),
and the decisions show both paths ran.
"""

import torch
import torch.distributed as dist

from support.multirank import shared

THRESHOLD = 512
TOKEN_COUNTS = (8, 24, 64, 1024, 2048, 4096)  # 3 at or below the threshold, 3 above


def run_compiled(rank, world_size):
    import fcpass
    from torch._inductor.compile_fx import compile_fx

    name = dist.group.WORLD.group_name
    compilations = []

    def counting_inductor(gm, example_inputs):
        compilations.append(gm)
        return compile_fx(gm, example_inputs)

    def layer(x, w_row, w_col, b_col):
        shard = torch.ops.fcpass.mm_reduce_scatter(x, w_row, None, name, world_size, THRESHOLD)
        _, (out,) = torch.ops.fcpass.all_gather_mm(torch.relu(shard), [w_col], [b_col], name, world_size, THRESHOLD)
        return out * 2 + 1

    compiled = torch.compile(layer, backend=counting_inductor, fullgraph=True)
    g = torch.Generator().manual_seed(rank)
    w_row, w_col, b_col = torch.randn(32, 48, generator=g), torch.randn(48, 16), torch.randn(16)
    errors = []
    fcpass.reset_decision_counts()
    for m in TOKEN_COUNTS:
        x = torch.randn(m, 32, generator=g)
        torch._dynamo.mark_dynamic(x, 0)
        got = compiled(x, w_row, w_col, b_col)
        want = layer(x, w_row, w_col, b_col)
        errors.append((got - want).abs().max().item() / want.abs().max().item())
    return {"compilations": len(compilations), "errors": errors, "decisions": fcpass.decision_counts()}


COMPILED = shared(run_compiled, timeout=240)


def test_one_compilation_across_the_threshold():
    per_rank = COMPILED()
    for r in per_rank:
        assert r["compilations"] == 1
        assert max(r["errors"]) <= 1e-5
        paths = {(op, path): count for (op, path, _), count in r["decisions"].items()}
        # each op ran eagerly and compiled: 2 calls per token count
        for op in ("mm_reduce_scatter", "all_gather_mm"):
            assert paths[(op, "fused")] == 2 * 3 and paths[(op, "unfused")] == 2 * 3
    assert per_rank[0]["decisions"] == per_rank[1]["decisions"]
