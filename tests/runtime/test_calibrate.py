"""``python -m fcpass.calibrate``, the installed tool that measures a threshold table: on local gloo ranks it
starts itself, and as one rank of a group torchrun starts (the way it runs on a user's NPUs or GPUs, over HCCL
or NCCL; here over gloo). Either way the table it writes is one ``PassConfig(threshold_table=...)`` loads, for
the backend the device's tensors run on, with an entry per op and shape, and the report has the check's
ratios. (The numbers are this machine's: not checked.)"""

import json
import subprocess
import sys

import pytest

import fcpass
from fcpass import measure
from devtools.launch import free_ports

ARGS = ["--shapes", "256x128", "--tokens", "64,512", "--out", "table.json", "--report", "report.json"]
LAUNCHES = {
    "local gloo ranks": [sys.executable, "-m", "fcpass.calibrate", "--world-size", "2", *ARGS],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "{port}",
                 "-m", "fcpass.calibrate", "--launched", "--device", "cpu", *ARGS],
}


@pytest.mark.parametrize("launch", LAUNCHES)
def test_it_writes_a_table_the_config_loads_and_a_report(tmp_path, launch):
    (port,) = free_ports(1)
    command = [word.format(port=port) for word in LAUNCHES[launch]]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["backend"] == "generic" and table["measured"]["backend"] == "gloo"
    assert sorted(entry["op"] for entry in table["entries"]) == sorted(measure.OPS)
    assert fcpass.PassConfig(threshold_table=str(tmp_path / "table.json")).table() is not None
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["check"]) == len(measure.OPS) * 2
    assert "wrote table.json and report.json" in done.stdout


def test_a_device_without_a_launcher_is_refused_plainly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fcpass.calibrate", "--device", "npu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "run it with --launched, one process per device (torchrun)" in done.stderr
