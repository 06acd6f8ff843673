"""vLLM's engine on your model without and with fcpass, side by side: the greedy tokens of each, and their times.

    python -m fcpass.compare --model MODEL [--fcpass JSON] [--engine-args JSON] [--prompt-tokens 512,4096]
                             [--batch 8] [--decode-steps 32] [--repeats 3] [--json compare.json]

On 8 GPUs, for example:

    python -m fcpass.compare --model /models/Qwen3-32B --fcpass '{"sequence_parallel": true}' \\
        --engine-args '{"tensor_parallel_size": 8, "dtype": "bfloat16"}'

(on Ascend, vllm-ascend's own settings go in the engine's ``additional_config``, as ``vllm serve`` takes them).
Two engine processes (fcpass/engine_run.py), one after the other, so that each has the devices to itself:
``vllm.LLM(model, **engine_args)`` without fcpass, then with
``compilation_config=fcpass.vllm.compilation_config(fields)`` (an engine_args compilation_config is kept
under it). Each times the prefill of one prompt of each ``--prompt-tokens`` length (``max_tokens=1``) and a
decode step at ``--batch`` prompts ((time of 1 + steps tokens - time of 1 token) / steps): medians of
``--repeats`` after a warm-up. Prints per point both times and their ratio, whether the greedy tokens are the
same, and what fcpass's ops did in each worker; ``--json`` writes all of it. Below the thresholds the fused ops
run the graph's own matmuls and collectives, so the tokens are the same; above them fused matmuls sum in
another order, so a near-tie may pick another token far into a generation.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys

from fcpass import cli
from fcpass.engine_run import run_process

logger = logging.getLogger(__name__)

# What vllm.LLM gets unless --engine-args says otherwise: repeated prompts prefill again (no prefix cache), prompts
# are token ids (no tokenizer), sampling is greedy from one seed
ENGINE_DEFAULTS = {"seed": 0, "enable_prefix_caching": False, "skip_tokenizer_init": True}
TIMEOUT_S = 3600  # an engine's start (compiling on a cold cache) and every call


def plan(prompt_tokens, batch: int, decode_steps: int, repeats: int, engine_args: dict) -> dict:
    """The calls each engine times: one prefill per length, then a decode batch of 1 and of 1 + steps tokens."""
    calls = [{"name": f"prefill {n}", "prompts": [n], "max_tokens": 1, "repeats": repeats} for n in prompt_tokens]
    decode_prompt = min(prompt_tokens)
    calls += [{"name": f"decode batch {batch}, {n} tokens", "prompts": [decode_prompt] * batch, "max_tokens": n,
               "repeats": repeats} for n in (1, 1 + decode_steps)]
    return {"engine_args": {**ENGINE_DEFAULTS, **engine_args}, "calls": calls}


def points(run: dict) -> dict[str, float]:
    """{point: ms}: each prefill's median, and the decode step's (the two decode calls' difference over the
    steps between their ``max_tokens``)."""
    found = {call["name"]: call["median_ms"] for call in run["calls"] if call["name"].startswith("prefill")}
    first, last = (call for call in run["calls"] if call["name"].startswith("decode"))
    steps = last["max_tokens"] - first["max_tokens"]
    found[f"decode step, batch {len(first['prompts'])}"] = (last["median_ms"] - first["median_ms"]) / steps
    return found


def summary(runs: dict) -> dict:
    """The two runs side by side: per point both times and the ratio with / without; the tokens; the decisions."""
    without, with_ = (points(runs[name]) for name in ("without fcpass", "with fcpass"))
    rows = [{"point": point, "without_ms": without[point], "with_ms": with_[point],
             "ratio": with_[point] / without[point] if without[point] > 0 else float("nan")} for point in without]
    ids = {name: [call["ids"] for call in run["calls"]] for name, run in runs.items()}
    per_call = [call["decisions"] for call in runs["with fcpass"]["calls"]]  # each a list of the workers' counts
    decisions = [dict(sum(map(collections.Counter, workers), collections.Counter())) for workers in zip(*per_call)]
    return {"points": rows, "greedy_tokens_equal": ids["without fcpass"] == ids["with fcpass"],
            "decisions_per_worker": decisions, "reports_per_worker": runs["with fcpass"]["reports"],
            "start_s": {name: run["start_s"] for name, run in runs.items()}}


def compare(model: str, pass_fields: dict, plan_: dict, timeout: float = TIMEOUT_S, env: dict | None = None) -> dict:
    """Both engines, one after the other; their runs by name ("without fcpass", "with fcpass")."""
    runs = {}
    for name, fields in (("without fcpass", None), ("with fcpass", pass_fields)):
        logger.info("starting the engine %s", name)
        runs[name] = run_process(name, model, plan_, fields, timeout, env)
    return runs


def table(result: dict) -> str:
    lines = [f"{'point':<24} {'without fcpass':>15} {'with fcpass':>12} {'ratio':>6}"]
    lines += [f"{r['point']:<24} {r['without_ms']:>12.2f} ms {r['with_ms']:>9.2f} ms {r['ratio']:>6.3f}"
              for r in result["points"]]
    lines.append(f"greedy tokens the same: {'yes' if result['greedy_tokens_equal'] else 'NO'}")
    for worker, counts in enumerate(result["decisions_per_worker"]):
        said = ", ".join(f"{key} {n}" for key, n in sorted(counts.items())) or "no fused op ran"
        lines.append(f"worker {worker}, fcpass's ops: {said}")
    return "\n".join(lines)


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{what}: not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{what}: a JSON object is needed, not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    found.add_argument("--model", required=True, help="what vllm.LLM(model=...) takes: a folder or a model name")
    found.add_argument("--fcpass", default="{}", type=lambda t: _json_object(t, "--fcpass"),
                       help="PassConfig fields, as in --additional-config's \"fcpass\" entry (default: {})")
    found.add_argument("--engine-args", default="{}", type=lambda t: _json_object(t, "--engine-args"),
                       help="vllm.LLM's keyword arguments as JSON, e.g. tensor_parallel_size, dtype")
    found.add_argument("--prompt-tokens", default="512,4096", type=lambda t: cli.int_list(t, "--prompt-tokens"))
    found.add_argument("--batch", type=int, default=8, help="prompts per decode step")
    found.add_argument("--decode-steps", type=int, default=32)
    found.add_argument("--repeats", type=int, default=3, help="timed calls per point (after one warm-up)")
    found.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per engine")
    found.add_argument("--json", help="write the result here")
    return found


def main(argv=None) -> int:
    cli_parser = parser()
    args = cli_parser.parse_args(argv)
    for name in ("batch", "decode_steps", "repeats"):
        if getattr(args, name) < 1:
            cli_parser.error(f"--{name.replace('_', '-')} must be >= 1")
    import fcpass

    try:  # a bad field fails here, before an engine starts
        fcpass.PassConfig.from_dict(args.fcpass)
    except (TypeError, ValueError) as error:
        cli_parser.error(f"--fcpass: {error}")
    cli.setup_logging()
    plan_ = plan(args.prompt_tokens, args.batch, args.decode_steps, args.repeats, args.engine_args)
    runs = compare(args.model, args.fcpass, plan_, args.timeout)
    result = {"model": args.model, "engine_args": plan_["engine_args"], "fcpass": args.fcpass,
              **summary(runs), "runs": runs}
    print(table(result))
    if args.json:
        cli.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
