"""The command line: many traces with --jobs and --junit, --ram, option validation, help texts."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmm import cli

REPO = Path(__file__).resolve().parents[1]


def _traces(tmp_path: Path) -> list[str]:
    good = tmp_path / "good.qtrace"
    good.write_text("readl 0xfff00044\nOK 0x4f20\n")
    bad = tmp_path / "bad.qtrace"
    bad.write_text("readl 0xfff00044\nOK 0x4f21\n")
    broken = tmp_path / "broken.qtrace"
    broken.write_text("readl 0xfff00044\nwritel what\n")
    good2 = tmp_path / "good2.qtrace"
    good2.write_text("# p2m: scattered\nreadl 0x0c000020\nOK 0x2\n")
    return [str(good), str(bad), str(broken), str(good2)]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_replay_many_traces_prints_a_line_each_a_total_and_junit(tmp_path, capsys, jobs):
    paths = _traces(tmp_path)
    junit = tmp_path / "report.xml"
    assert cli.main(["replay", *paths, "--jobs", jobs, "--junit", str(junit)]) == 2     # worst: malformed
    cap = capsys.readouterr()
    out = cap.out.splitlines()
    assert [ln.split(":")[0] for ln in out[:2]] == [paths[0], paths[3]]                 # ok lines, in order
    assert out[-1].startswith("total: 4 traces, 2 passed, 1 failed, 1 errors")
    err = [ln for ln in cap.err.splitlines() if not ln.startswith("vmm: unprotected master:")]
    assert err[0].startswith(f"{paths[1]}:2: expected OK 0x4f21") and err[1].startswith(f"{paths[2]}:2: ")
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == paths
    assert cases[paths[1]].find("failure").get("message").startswith(f"{paths[1]}:2: expected")
    assert cases[paths[2]].find("error") is not None and cases[paths[0]].find("failure") is None


def test_replay_many_exit_status_is_the_worst(tmp_path, capsys):
    paths = _traces(tmp_path)
    assert cli.main(["replay", paths[0], paths[3], "-j", "2"]) == 0
    assert cli.main(["replay", paths[0], paths[1]]) == 1
    assert cli.main(["replay", paths[0], paths[1], "--json"]) == 1
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [ln.get("status") for ln in lines[-3:]] == [0, 1, 1] and lines[-1]["total"] == 2


def test_replay_ram_option_wins_over_the_header(tmp_path):
    p = tmp_path / "ram.qtrace"
    p.write_text("# ram: 64M\nreadq 0x0c000008\nOK 0x4000000\n")
    assert cli.main(["replay", str(p)]) == 0
    assert cli.main(["replay", str(p), "--ram", "256M"]) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e30", "1e-6", "-1", "ten", "0.001"])
def test_run_timeout_is_validated_by_argparse(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "hello", f"--timeout={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --timeout" in err and "0 (no limit) or 0.01 to 86400 seconds" in err


@pytest.mark.parametrize("value", ["0", "-1", "x", "100000"])
def test_replay_jobs_is_validated(value, tmp_path, capsys):
    paths = _traces(tmp_path)
    if value == "0":                                  # 0: one per CPU
        assert cli.main(["replay", paths[0], "--jobs", value]) == 0
        return
    with pytest.raises(SystemExit) as e:
        cli.main(["replay", paths[0], "--jobs", value])
    assert e.value.code == 2 and "argument -j/--jobs" in capsys.readouterr().err


@pytest.mark.parametrize("where, words", [
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/t.qtrace", "no such directory"),
    ("/proc/t.qtrace", "cannot write"),
])
def test_record_path_is_checked_before_the_run(tmp_path, capsys, where, words):
    path = where.format(tmp=tmp_path)
    assert cli.main(["run", "hello", "--backend", "emulated", "--record", path]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "unprotected master" not in ln]
    assert len(err) == 1 and err[0].startswith(f"vmm: --record {path}") and words in err[0]


def test_record_to_a_full_disk_is_one_line():
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "hello", "--backend", "emulated", "--record",
                        "/dev/full"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == "vmm: --record /dev/full: cannot write: No space left on device"


def test_junit_path_is_checked_before_replaying(tmp_path, capsys):
    paths = _traces(tmp_path)
    assert cli.main(["replay", paths[0], "--junit", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"vmm: --junit {tmp_path}: cannot write")


def test_unknown_payload_lists_the_built_ones(capsys):
    assert cli.main(["run", "no_such_payload", "--backend", "emulated"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no payload named 'no_such_payload'" in err[0] and "hello" in err[0]
    assert cli.main(["info", "no_such_payload"]) == 2


@pytest.mark.parametrize("cmd, codes", [("run", ["124", "125", "126", "debug-exit"]),
                                         ("replay", ["0 ", "1 ", "2 ", "holds no request"])])
def test_help_lists_the_exit_statuses(cmd, codes):
    r = subprocess.run([sys.executable, "-m", "vmm", cmd, "--help"], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0 and "exit status" in r.stdout
    assert all(c in r.stdout for c in codes), r.stdout
