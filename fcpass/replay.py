"""``python -m fcpass.replay DIR``: run the pass again on graphs ``FCPASS_CAPTURE`` wrote, on any CPU.

    python -m fcpass.replay DIR [--config JSON] [--json OUT] [--expect FILE] [--numerics]

For each capture under DIR: the pass as the live compile ran it (its groups,
sizes and compile range; ``--config`` a JSON object whose fields replace the
captured config's), its why-not table and the op counts that changed. Checks
that each rewritten graph is well formed (fake propagation gives the
original's outputs), that the replayed report equals the live run's (with the
captured config), that ranks of one compile agree, and with ``--expect`` that
the results equal a ``--json`` file written before. ``--numerics`` runs every
fused site on local gloo ranks against the site's own ops, both sides of its
threshold (:mod:`fcpass.numerics`; vLLM's oneDNN sites need vLLM installed).

Exit status: 0 all well; 1 a check failed; 2 a capture (or the config) could
not be used, said in one line. No process group, vLLM, vllm-ascend or
torch_npu is needed (:mod:`fcpass.testing`).
"""

from __future__ import annotations

import argparse
import json
import sys

from fcpass.testing import CaptureError, capture_folders, load, ranks_disagree, replay

OK, CHECK_FAILED, UNUSABLE = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(prog="python -m fcpass.replay", description=__doc__.split("\n\n")[0])
    found.add_argument("dir", help="a folder FCPASS_CAPTURE wrote (or one capture in it)")
    found.add_argument("--config", help="JSON object: PassConfig fields replacing the captured config's")
    found.add_argument("--json", dest="json_out", help="write the results here")
    found.add_argument("--expect", help="a --json file the results must equal (reports and ops after)")
    found.add_argument("--numerics", action="store_true",
                       help="run each fused site on local gloo ranks against the site's own ops, both sides of "
                            "its threshold")
    return found


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = json.loads(args.config) if args.config else None
        expected = _read_json(args.expect) if args.expect else None
        results = [replay(load(folder), config) for folder in capture_folders(args.dir)]
    except (CaptureError, ValueError) as exc:
        print(f"fcpass.replay: {exc}", file=sys.stderr)
        return UNUSABLE
    if not results:
        print(f"fcpass.replay: {args.dir}: no capture in it", file=sys.stderr)
        return UNUSABLE
    problems = []
    for result in results:
        _print(result)
        problems += [f"{result.capture.folder.name}: {p}" for p in result.problems]
    problems += ranks_disagree(results)
    document = {"graphs": [result.as_json() for result in results]}
    if args.numerics:
        problems += _numerics(results, config, document)
    if expected is not None:
        problems += _differences(document, expected)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(document, f, indent=1)
    for problem in problems:
        print(f"FAILED: {problem}")
    print(f"fcpass.replay: {len(results)} graphs replayed, {len(problems)} problems")
    return CHECK_FAILED if problems else OK


def _numerics(results, config: dict | None, document: dict) -> list[str]:
    from fcpass import numerics

    threshold = (config or {}).get("threshold_tokens", results[0].capture.facts["config"].get("threshold_tokens"))
    lines = numerics.check(results, threshold)
    for graph in document["graphs"]:
        graph["numerics"] = lines[graph["capture"]]
        print(f"== {graph['capture']}: numerics")
        for line in graph["numerics"]:
            print(f"   {line}")
    return [f"{name}: {line}" for name, found in lines.items() for line in found if line.startswith("FAILED")]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CaptureError(f"--expect {path}: {exc}") from None


def _print(result) -> None:
    capture = result.capture
    print(f"== {capture.folder.name}: rank {capture.rank} of {capture.world_size}")
    print(result.table)
    changed = sorted(op for op in {*result.ops_before, *result.ops_after}
                     if result.ops_before.get(op, 0) != result.ops_after.get(op, 0))
    for op in changed:
        print(f"   {op}: {result.ops_before.get(op, 0)} -> {result.ops_after.get(op, 0)}")
    for note in result.notes:
        print(f"   note: {note}")


def _differences(document: dict, expected: dict) -> list[str]:
    def by_graph(graphs):  # a capture's folder name holds its pid: another run, another name
        return {f"rank {g['rank']} graph {g['graph']}": g for g in graphs}

    got, want = by_graph(document["graphs"]), by_graph(expected.get("graphs", []))
    problems = [f"{name}: expected, not replayed" for name in sorted(want.keys() - got.keys())]
    problems += [f"{name}: replayed, not expected" for name in sorted(got.keys() - want.keys())]
    for name in sorted(want.keys() & got.keys()):
        for field in ("report", "ops_after"):
            if got[name][field] != want[name][field]:
                problems.append(f"{name}: {field} differs from --expect")
    return problems


if __name__ == "__main__":
    sys.exit(main())
