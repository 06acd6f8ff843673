"""Ideal overlap limit of fused matmul+collective for Llama-70B at TP=8, next to what fcpass measured on this CPU.

    python -m benchmarks.limit_model [--hardware h100,ascend-910b,ascend-910b-ring] [--tokens 1024,4096,16384]
                                     [--measured benchmarks/results/ops.json] [--min-tokens 1024] [--neighbours 3]
                                     [--latency-us 0]

Why: a fused op can at best hide the shorter of compute and communication
behind the longer, so its ceiling is (compute + comm) / max(compute, comm),
set by the compute/comm ratio alone. This script computes that ceiling for
real hardware figures and puts next to it what the CPU benchmark
(benchmarks/ops.py) reached at the nearest compute/comm ratio.

Model (pure arithmetic, nothing measured; every figure is a stated input)
-------------------------------------------------------------------------
Llama-70B: hidden 8192, intermediate 28672, 64 query heads, 8 KV heads,
head dim 128, 80 layers; bf16 (2 bytes). TP = world size ws = 8 with
sequence parallelism (FlashComm v1): per layer two matmul -> reduce_scatter
sites (row parallel) and two all_gather -> matmul sites (column parallel):

    site       op                 k     n      collective moves
    o_proj     mm_reduce_scatter  1024  8192   the (m, n) product
    down_proj  mm_reduce_scatter  3584  8192   the (m, n) product
    qkv_proj   all_gather_mm      8192  1280   the (m, k) input
    gate_up    all_gather_mm      8192  7168   the (m, k) input

(k, n) are per rank: o_proj k = 64*128/8, down k = 28672/8, qkv n =
(64 + 2*8)*128/8, gate_up n = 2*28672/8. m = tokens in the batch.

    compute  = 2 * m * k * n / peak_flops
    comm     = (ws - 1) / ws * m * width * 2 bytes / link_bw + (ws - 1) * latency
               width = n (reduce_scatter) or k (all_gather); link_bw = per rank,
               per direction; a ring reduce_scatter or all_gather sends (and
               receives) (ws-1)/ws of the full tensor per rank
    unfused  = compute + comm
    fused    = max(compute, comm)               (perfect overlap)
    ceiling  = unfused / fused                  (ideal speedup)
    per layer: the four sites summed, each site overlapped on its own.

Assumptions: peak dense FLOPS and peak link bandwidth are reached (real
GEMMs and collectives get less, and chunked fused kernels lose some GEMM
efficiency); latency defaults to 0, so compute/comm, hence the ceiling, does
not depend on the token count (tokens only scale the times); attention,
norms and the rest of the layer are not counted.

Hardware (HARDWARE below): H100 SXM, 989 TFLOPS dense bf16 and NVLink 4 at
450 GB/s per direction (NVIDIA data sheet figures, 900 GB/s bidirectional).
Ascend 910B: published vendor/press figures, not measured here: ~313 TFLOPS
fp16 (press reports range 313-320), HCCS 56 GB/s per link, 7 links per card
in an 8-card full mesh = 392 GB/s aggregate. Whether 56 GB/s is per direction
is not stated consistently; "ascend-910b" assumes it is and that HCCL's mesh
collectives use all 7 links (392 GB/s per direction, optimistic),
"ascend-910b-ring" a ring over one link (56 GB/s, pessimistic).

Measured side: benchmarks/results/ops.json (2 gloo ranks, fp32, this CPU),
points with at least ``--min-tokens`` tokens (below ~1k tokens a call takes
a few ms and the noise exceeds the effect: some small points even beat
their own ceiling). For each ideal row, the ``--neighbours`` points of the same op whose
matmul_ms / collective_ms is nearest (in log) to the row's compute/comm;
reported: their ratio, their own ceiling (matmul + collective) / max(matmul,
the cheaper of collective and exchange: the pipeline's way), and the
medians of measured speedup (unfused / best fused) and fraction of limit
(ops.py's: max(matmul, communication) / best fused). A row whose nearest measured
ratio is more than FAR_MATCH times off is flagged: the CPU benchmark's
shapes do not reach that regime, so the comparison there is only indicative.

Outputs benchmarks/results/limit_model.json and limit_model.png (if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass

from benchmarks import cli

logger = logging.getLogger("limit_model")

BYTES_PER_ELEMENT = 2  # bf16 / fp16
WORLD_SIZE = 8
DEFAULT_TOKENS = (1024, 4096, 16384)
DEFAULT_MIN_MEASURED_TOKENS = 1024
FAR_MATCH = 2.0  # measured compute/comm this many times off the ideal row's: flagged


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense, 16-bit
    link_gb_per_s: float  # per rank, per direction, usable by one reduce_scatter / all_gather
    source: str


HARDWARE = {h.name: h for h in (
    Hardware("h100", 989.0, 450.0,
             "NVIDIA H100 SXM data sheet: 989 TFLOPS dense bf16; NVLink 4 900 GB/s bidirectional = 450 per direction"),
    Hardware("ascend-910b", 313.0, 392.0,
             "published vendor/press figures, not measured: ~313 TFLOPS fp16; HCCS 7 links x 56 GB/s = 392 GB/s "
             "per card in an 8-card full mesh, assumed per direction and all used by mesh collectives (optimistic)"),
    Hardware("ascend-910b-ring", 313.0, 56.0,
             "as ascend-910b, but a ring collective over one 56 GB/s HCCS link per direction (pessimistic)"),
)}


@dataclass(frozen=True)
class Site:
    name: str
    op: str  # mm_reduce_scatter / all_gather_mm, as in benchmarks/ops.py
    k: int
    n: int

    @property
    def comm_width(self) -> int:
        """Columns of the tensor the collective moves: the product (reduce_scatter) or the input (all_gather)."""
        return self.n if self.op == "mm_reduce_scatter" else self.k


LLAMA_70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128, "layers": 80}


def llama_sites(model: dict, world_size: int) -> tuple[Site, ...]:
    """The four fused sites of one decoder layer at TP=world_size with sequence parallelism, per-rank shapes."""
    hidden, inter, head_dim = model["hidden"], model["intermediate"], model["head_dim"]
    return (
        Site("o_proj", "mm_reduce_scatter", model["heads"] * head_dim // world_size, hidden),
        Site("down_proj", "mm_reduce_scatter", inter // world_size, hidden),
        Site("qkv_proj", "all_gather_mm", hidden, (model["heads"] + 2 * model["kv_heads"]) * head_dim // world_size),
        Site("gate_up_proj", "all_gather_mm", hidden, 2 * inter // world_size),
    )


def site_times(site: Site, tokens: int, hw: Hardware, world_size: int, latency_us: float) -> dict:
    """Ideal compute, comm, unfused and fused time (µs) of one site; formulas in the module docstring."""
    flops = 2 * tokens * site.k * site.n
    comm_bytes = (world_size - 1) / world_size * tokens * site.comm_width * BYTES_PER_ELEMENT
    compute_us = flops / (hw.peak_tflops * 1e12) * 1e6
    comm_us = comm_bytes / (hw.link_gb_per_s * 1e9) * 1e6 + (world_size - 1) * latency_us
    return {"flops": flops, "comm_bytes": comm_bytes, "compute_us": compute_us, "comm_us": comm_us,
            "compute_over_comm": compute_us / comm_us, "unfused_us": compute_us + comm_us,
            "fused_us": max(compute_us, comm_us), "ideal_speedup": ceiling(compute_us / comm_us)}


def ceiling(compute_over_comm: float) -> float:
    """(compute + comm) / max(compute, comm) as a function of their ratio."""
    return (compute_over_comm + 1) / max(compute_over_comm, 1.0)


# --------------------------------------------------------------------------- measured CPU points


def measured_ceiling(point: dict) -> float:
    """A CPU point's own ceiling: unfused pays matmul + collective, fused at best max(matmul, communication),
    communication being the cheaper of the collective and the pipeline's exchange (ops.py's limit)."""
    comm = min(point["collective_ms"], point.get("exchange_ms") or point["collective_ms"])
    return (point["matmul_ms"] + point["collective_ms"]) / max(point["matmul_ms"], comm)

def load_measured(path: str, min_tokens: int) -> list[dict]:
    """The points of benchmarks/ops.py's JSON with at least ``min_tokens`` that carry what the comparison needs."""
    with open(path) as f:
        data = json.load(f)
    needed = ("op", "k", "n", "tokens", "matmul_ms", "collective_ms", "speedup", "fraction_of_limit")
    points = [p for p in data.get("points", []) if all(key in p for key in needed)
              and p["matmul_ms"] > 0 and p["collective_ms"] > 0 and p["tokens"] >= min_tokens]
    if not points:
        raise ValueError(f"{path} has no usable points with >= {min_tokens} tokens (each needs {', '.join(needed)})")
    return points


def nearest_measured(points: list[dict], op: str, ratio: float, count: int) -> dict | None:
    """The ``count`` points of ``op`` nearest to ``ratio`` in log(matmul_ms / collective_ms), summarised."""
    same_op = [p for p in points if p["op"] == op]
    if not same_op:
        return None
    near = sorted(same_op, key=lambda p: abs(math.log(p["matmul_ms"] / p["collective_ms"] / ratio)))[:count]
    ratios = [p["matmul_ms"] / p["collective_ms"] for p in near]
    return {
        "points": [{key: p[key] for key in ("op", "k", "n", "tokens", "matmul_ms", "collective_ms", "speedup",
                                               "fraction_of_limit")} | {"compute_over_comm": r}
                   for p, r in zip(near, ratios)],
        "compute_over_comm_median": statistics.median(ratios),
        "far": not 1 / FAR_MATCH <= statistics.median(ratios) / ratio <= FAR_MATCH,
        "ceiling_median": statistics.median(measured_ceiling(p) for p in near),
        "speedup_median": statistics.median(p["speedup"] for p in near),
        "fraction_of_limit_median": statistics.median(p["fraction_of_limit"] for p in near),
    }


# --------------------------------------------------------------------------- the table

def build_rows(hardware: list[Hardware], tokens_list, sites, world_size: int, latency_us: float,
               measured: list[dict] | None, neighbours: int) -> tuple[list[dict], list[dict]]:
    """One row per (hardware, tokens, site), and one per-layer total per (hardware, tokens)."""
    rows, layers = [], []
    for hw in hardware:
        for tokens in tokens_list:
            site_rows = []
            for site in sites:
                row = {"hardware": hw.name, "tokens": tokens, "site": site.name, "op": site.op, "k": site.k,
                       "n": site.n, **site_times(site, tokens, hw, world_size, latency_us)}
                if measured is not None:
                    row["measured_cpu"] = nearest_measured(measured, site.op, row["compute_over_comm"], neighbours)
                site_rows.append(row)
            rows += site_rows
            unfused = sum(r["unfused_us"] for r in site_rows)
            fused = sum(r["fused_us"] for r in site_rows)
            layers.append({"hardware": hw.name, "tokens": tokens,
                           "compute_us": sum(r["compute_us"] for r in site_rows),
                           "comm_us": sum(r["comm_us"] for r in site_rows),
                           "unfused_us": unfused, "fused_us": fused, "ideal_speedup": unfused / fused})
    return rows, layers


def print_tables(rows: list[dict], layers: list[dict], model_layers: int) -> None:
    print(f"{'hardware':<17} {'tokens':>6} {'site':<13} {'compute us':>10} {'comm us':>9} {'comp/comm':>9} "
          f"{'ideal':>6} | {'CPU comp/comm':>13} {'CPU ideal':>9} {'CPU speedup':>11} {'CPU of limit':>12}")
    for r in rows:
        m = r.get("measured_cpu")
        cpu = (f"{m['compute_over_comm_median']:>12.2f}{'*' if m['far'] else ' '} {m['ceiling_median']:>8.2f}x "
               f"{m['speedup_median']:>10.2f}x "
               f"{m['fraction_of_limit_median']:>12.2f}") if m else f"{'-':>13} {'-':>9} {'-':>11} {'-':>12}"
        print(f"{r['hardware']:<17} {r['tokens']:>6} {r['site']:<13} {r['compute_us']:>10.1f} {r['comm_us']:>9.1f} "
              f"{r['compute_over_comm']:>9.2f} {r['ideal_speedup']:>5.2f}x | {cpu}")
    if any(r.get("measured_cpu") and r["measured_cpu"]["far"] for r in rows):
        print(f"* the nearest measured CPU compute/comm is more than {FAR_MATCH:g}x off the ideal row's: the CPU "
              f"benchmark's shapes do not reach that regime")
    print(f"\nPer layer (4 sites; x{model_layers} layers for the model's linears):")
    print(f"{'hardware':<17} {'tokens':>6} {'compute us':>10} {'comm us':>9} {'unfused us':>10} {'fused us':>9} "
          f"{'ideal':>6} {'model ms unfused/fused':>23}")
    for t in layers:
        model = f"{t['unfused_us'] * model_layers / 1e3:.1f} / {t['fused_us'] * model_layers / 1e3:.1f}"
        print(f"{t['hardware']:<17} {t['tokens']:>6} {t['compute_us']:>10.1f} {t['comm_us']:>9.1f} "
              f"{t['unfused_us']:>10.1f} {t['fused_us']:>9.1f} {t['ideal_speedup']:>5.2f}x {model:>23}")


def plot(rows: list[dict], measured: list[dict] | None, path: str) -> bool:
    """Ideal ceiling vs compute/comm (curve), the hardware sites on it, and the measured CPU speedups."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ratios = [r["compute_over_comm"] for r in rows] + [p["matmul_ms"] / p["collective_ms"] for p in measured or ()]
    lo, hi = min(ratios) / 1.5, max(ratios) * 1.5
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(grid, [ceiling(x) for x in grid], color="black", linewidth=1, label="ideal (compute+comm)/max")
    hardware = list(dict.fromkeys(r["hardware"] for r in rows))
    for index, name in enumerate(hardware):
        mine = [r for r in rows if r["hardware"] == name]  # token counts coincide unless --latency-us > 0
        ax.scatter([r["compute_over_comm"] for r in mine], [r["ideal_speedup"] for r in mine], marker="D", s=30,
                   zorder=3, color=f"C{index + 2}", label=f"ideal sites, {name}")
        most_tokens = max(r["tokens"] for r in mine)
        for r in mine:
            if r["tokens"] == most_tokens:
                ax.annotate(r["site"], (r["compute_over_comm"], r["ideal_speedup"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    for op, marker in (("mm_reduce_scatter", "o"), ("all_gather_mm", "s")):
        points = [p for p in measured or () if p["op"] == op]
        if points:
            ax.scatter([p["matmul_ms"] / p["collective_ms"] for p in points], [p["speedup"] for p in points],
                       marker=marker, facecolors="none", edgecolors="tab:red" if marker == "o" else "tab:blue",
                       label=f"measured CPU {op} (unfused / best fused)")
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("compute / comm (ideal: FLOPS and link bandwidth; CPU: matmul_ms / collective_ms)")
    ax.set_ylabel("speedup of fused over unfused")
    ax.set_title(f"Llama-70B TP={WORLD_SIZE} sites: overlap ceiling vs measured (2 gloo ranks, fp32 CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------- CLI

def _hardware_list(text: str) -> list[Hardware]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(HARDWARE))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown hardware {unknown or text!r}; known: {', '.join(HARDWARE)}")
    return [HARDWARE[name] for name in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", type=_hardware_list, default=list(HARDWARE.values()),
                        help=f"comma-separated, of {', '.join(HARDWARE)} (default: all)")
    parser.add_argument("--tokens", type=lambda text: cli.int_list(text, "--tokens"), default=DEFAULT_TOKENS,
                        help="comma-separated token counts")
    parser.add_argument("--measured", default=os.path.join(cli.RESULTS_DIR, "ops.json"),
                        help="benchmarks/ops.py output to compare with ('' for none)")
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_MEASURED_TOKENS,
                        help="ignore measured points below this many tokens (noise-dominated)")
    parser.add_argument("--neighbours", type=int, default=3, help="measured points per ideal row")
    parser.add_argument("--latency-us", type=float, default=0.0,
                        help="per ring step collective latency (µs), added (ws-1) times; default 0 (bandwidth only)")
    parser.add_argument("--out", default=os.path.join(cli.RESULTS_DIR, "limit_model.json"))
    args = parser.parse_args(argv)
    if args.neighbours < 1:
        parser.error(f"--neighbours must be >= 1, got {args.neighbours}")
    if args.min_tokens < 0:
        parser.error(f"--min-tokens must be >= 0, got {args.min_tokens}")
    if not args.latency_us >= 0:  # also rejects nan
        parser.error(f"--latency-us must be >= 0, got {args.latency_us}")
    cli.setup_logging()

    measured = None
    if args.measured:
        if not os.path.exists(args.measured):
            parser.error(f"--measured {args.measured} does not exist (run benchmarks/ops.py, or pass --measured '')")
        try:
            measured = load_measured(args.measured, args.min_tokens)
        except (ValueError, json.JSONDecodeError) as exc:
            parser.error(f"--measured {args.measured}: {exc}")
        logger.info("%d measured CPU points from %s", len(measured), args.measured)
    sites = llama_sites(LLAMA_70B, WORLD_SIZE)
    rows, layers = build_rows(args.hardware, args.tokens, sites, WORLD_SIZE, args.latency_us, measured,
                              args.neighbours)
    print_tables(rows, layers, LLAMA_70B["layers"])
    result = {
        "model": {"name": "Llama-70B", **LLAMA_70B}, "world_size": WORLD_SIZE,
        "bytes_per_element": BYTES_PER_ELEMENT,
        "latency_us_per_step": args.latency_us, "hardware": [asdict(h) for h in args.hardware],
        "sites": [asdict(s) | {"comm_width": s.comm_width} for s in sites],
        "formulas": {
            "compute": "2 * m * k * n / peak_flops",
            "comm": "(ws - 1) / ws * m * width * bytes / link_bw_per_direction + (ws - 1) * latency; "
                    "width = n (reduce_scatter) or k (all_gather)",
            "unfused": "compute + comm", "fused": "max(compute, comm)", "ideal_speedup": "unfused / fused",
            "per_layer": "sum over the 4 sites of unfused, and of fused (each site overlapped on its own)",
            "measured": "nearest --neighbours points of the same op (>= --min-tokens tokens) in "
                        "log(matmul_ms / collective_ms); medians",
        },
        "assumptions": ["peak FLOPS and peak link bandwidth reached", "no latency term unless --latency-us",
                        "attention, norms, elementwise ops not counted",
                        "Ascend 910B figures are published vendor/press figures, not measured",
                        "measured CPU side: 2 gloo ranks, fp32, 1 thread per rank (benchmarks/ops.py)"],
        "measured_source": args.measured or None, "measured_min_tokens": args.min_tokens,
        "rows": rows, "per_layer": layers,
    }
    cli.write_json(args.out, result)
    png = os.path.splitext(args.out)[0] + ".png"
    print(f"\nwrote {args.out}" + (f" and {png}" if plot(rows, measured, png) else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
