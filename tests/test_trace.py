"""MMIO traces: the qtest-language parser, the CPU-less replayer, `vmm replay` and the pytest plugin."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import cli, trace
from vmm.machine import Machine
from vmm.trace import TraceError, parse, replay_fresh, replay_text

REPO = Path(__file__).resolve().parents[1]
TRACES = sorted((REPO / "tests" / "traces").glob("*.qtrace"))


# -- parsing -----------------------------------------------------------------------------------
def test_numbers_follow_strtoul_and_replies_compare_numerically(machine):
    r = replay_text(machine, "readl 0x0c000000\nOK 0x4f464e49\n"          # short hex
                             "readl 0xfff00044\nOK 20256\n"                # decimal
                             "readb 0xfff00045\nOK 0117\n"                 # octal 0x4f
                             "inb 0xe9\nOK 0x00e9\n"
                             "readl 01400000000\nOK 0x000000004f464e49\n")  # octal address = 0x0c000000
    assert r.ok, r.message
    assert r.counts["expectations"] == 5


@pytest.mark.parametrize("text, line, what", [
    ("readl\n", 1, "readl takes ADDR"),
    ("writel 0x1000\n", 1, "writel takes ADDR VAL"),
    ("readl 0x10\n\n# c\nreadl 0xzz\n", 4, "not a number"),
    ("outb 0x10000 1\n", 1, "above 0xffff"),
    ("inq 0x10\n", 1, "no such request"),
    ("frobnicate 1 2\n", 1, "unknown request 'frobnicate'"),
    ("OK\n", 1, "before any request"),
    ("readl 0x0\nOK 0x1\nOK 0x2\n", 3, "a second reply"),
    ("writel 0x0 1\nOK 0x5\n", 2, "bare OK"),
    ("write 0x0 4 1234\n", 1, "0x followed by hex"),
    ("write 0x0 4 0x123\n", 1, "odd number of hex digits"),
    ("b64write 0x0 4 !!!\n", 1, "not base64"),
    ("read 0x0 0x100001\n", 1, "more than 1 MiB"),
    ("read 0x1000 -1\n", 1, "negative numbers are not accepted"),
    ("memset 0x1000 -5 1\n", 1, "negative numbers are not accepted"),
    ("readl -4\n", 1, "negative numbers are not accepted"),
    ("readl 0x10000000000000000\n", 1, "wider than 64 bits"),
    ("readl 1_000\n", 1, "no '_' separators"),
    ("writel 0x0 0x1_0\n", 1, "no '_' separators"),
    ("readl 0x+10\n", 1, "not a number"),
    ("readl \u0661\u0662\n", 1, "not a number"),                # Arabic-Indic digits: int() takes them
    ("readl 0x0\nOK 0x1_0\n", 2, "not a number"),
    ("readl 0x0\nIRQ raise -1\n", 2, "negative"),
    ("readl 0x0\nIRQ raise\n", 2, "IRQ raise N"),
    ("readl 0x0\nIRQ raise 3\nirq_intercept_in x\n", 2, "before the irq_intercept request at line 3"),
    ("[X +0.1] readl 0\n", 1, "unknown log prefix"),
])
def test_malformed_lines_name_their_line(text, line, what):
    with pytest.raises(TraceError) as e:
        parse(text, "t.qtrace")
    assert e.value.line == line
    assert str(e.value).startswith(f"t.qtrace:{line}: ")
    assert what in str(e.value)


def test_qtest_log_prefixes_and_comments_are_accepted(machine):
    log = ("[I 0.000001] OPENED\n"
           "[R +0.025087] readl 0xfff00044\n"
           "[S +0.028918] OK 0x0000000000004f20\n"
           "[DMA][R +0.03] write 0x1000 0x2 0xabcd   # a fuzzer DMA fill\n"
           "[S +0.03] OK\n"
           "[R +0.04] b64read 0x1000 0x2\n"
           "[S +0.04] OK q80=\n"
           "[R +0.05] read 0x1000 0x4\n"
           "[S +0.05] OK 0xabcd0000\n"
           "[I +1.0] CLOSED\n")
    r = replay_text(machine, log, "q.log")
    assert r.ok, r.message
    assert r.counts["requests"] == 4 and r.counts["expectations"] == 4


def test_header_options_build_the_machine():
    t = parse("# board: rcar-virt\n# p2m: scattered\n# ram: 64M\n# image: not a key\nreadl 0x0c000020\n"
              "# p2m: direct   (after the first request: not header)\n")
    assert t.header == {"board": "rcar-virt", "p2m": "scattered", "ram": "64M"}
    r = replay_fresh("# p2m: scattered\n# ram: 64M\nreadl 0x0c000020\nOK 0x2\nreadq 0x0c000008\nOK 0x4000000\n")
    assert r.ok, r.message


# -- replay semantics --------------------------------------------------------------------------
def test_mismatch_reports_the_reply_line(machine):
    r = replay_text(machine, "# c\nreadl 0xfff00044\nOK 0x4f20\nreadl 0xfff00044\nOK 0x4f21\nreadl 0x0\n", "t")
    assert (r.ok, r.status, r.line) == (False, 1, 5)
    assert r.message == ("t:5: expected OK 0x4f21, got OK 0x0000000000004f20 (readl 0xfff00044, line 4)")
    assert r.counts["requests"] == 2


def test_guest_memory_outside_ram_is_an_error_unless_fail_is_expected(machine):
    r = replay_text(machine, "write 0x20000000 4 0x11223344\n", "t")
    assert (r.status, r.line) == (2, 1) and "is neither guest RAM of dom0" in r.message
    r = replay_text(machine, "read 0xf0000000 4\n", "t")       # no reply: still an error
    assert r.status == 2
    r = replay_text(machine, "write 0x20000000 4 0x11223344\nFAIL\nmemset 0x1000 0 0\nOK\n", "t")
    assert r.ok, r.message
    r = replay_text(machine, "read 0x1000 4\nFAIL nope\n", "t")
    assert (r.status, r.line) == (1, 2) and "expected FAIL nope, got OK 0x00000000" in r.message


def test_guest_memory_requests(machine):
    r = replay_text(machine, "write 0x3000 8 0x1122\n"               # zero-filled to 8 bytes
                             "read 0x3000 8\nOK 0x1122000000000000\n"
                             "b64write 0x3004 4 3q2+7w==\n"
                             "b64read 0x3000 8\nOK ESIAAN6tvu8=\n"
                             "memset 0x3001 2 0x99\n"
                             "read 0x3000 4\nOK 0x11999900\n")
    assert r.ok, r.message
    assert machine.read_guest(0x3000, 8) == bytes.fromhex("11999900deadbeef")


def test_debug_exit_does_not_end_the_replay(machine):
    r = replay_text(machine, "outl 0xf4 0x7\nreadl 0xfff00044\nOK 0x4f20\n")
    assert r.ok and r.exit_status == 7 and r.counts["requests"] == 2


DMA3 = 0x0B003000


def test_irq_edges_are_checked_in_order(machine):
    setup = f"writel {DMA3 + 0x18:#x} 0x0\n"
    base = setup + f"writel {DMA3 + 0x1c:#x} 0x3\nIRQ raise 11\nwritel {DMA3 + 0x34:#x} 1\nIRQ lower 11\n"
    assert replay_text(machine, base).ok
    m2 = Machine.from_board("rcar-virt")
    try:
        # missing the lower: the unexpected edge is reported at the request that caused it
        r = replay_text(m2, setup + f"writel {DMA3 + 0x1c:#x} 0x3\nIRQ raise 11\nwritel {DMA3 + 0x34:#x} 1\n", "t")
        assert (r.status, r.line) == (1, 4)
        assert "expected no IRQ, got IRQ lower 11" in r.message
    finally:
        m2.close()
    r = replay_fresh(setup + f"writel {DMA3 + 0x1c:#x} 0x3\nIRQ raise 12\n", name="t")
    assert (r.status, r.line) == (1, 3) and "expected IRQ raise 12, got IRQ raise 11" in r.message
    r = replay_fresh(setup + f"writel {DMA3 + 0x1c:#x} 0x1\nIRQ raise 11\n", name="t")
    assert (r.status, r.line) == (1, 3) and "got no IRQ" in r.message


def test_edges_before_an_intercept_request_are_not_checked():
    r = replay_fresh(f"writel {DMA3 + 0x1c:#x} 0x3\nirq_intercept_in ioapic\nOK\n"
                     f"writel {DMA3 + 0x34:#x} 1\nIRQ lower 11\n")
    assert r.ok, r.message
    r = replay_fresh(f"writel {DMA3 + 0x1c:#x} 0x3\n")            # no IRQ lines at all: nothing checked
    assert r.ok and r.counts["irq_edges"] == 1


def test_machine_replay_returns_a_result(machine, tmp_path):
    p = tmp_path / "t.qtrace"
    p.write_text("readl 0xfff00044\nOK 0x4f20\n")
    r = machine.replay(str(p))
    assert r and r.ok and r.line is None and r.counts["requests"] == 1
    p.write_text("# p2m: scattered\nreadl 0xfff00044\n")
    r = machine.replay(str(p))
    assert r.status == 2 and "asks for p2m scattered" in r.message
    p.write_text("readl 0xfff00044\nOK 0x4f20 x\n")
    r = machine.replay(str(p))
    assert (r.status, r.line) == (2, 2)


def test_progress_bar_on_a_terminal(machine, monkeypatch, capsys):
    monkeypatch.setattr(trace.replay, "PROGRESS_MIN_BYTES", 10)
    monkeypatch.setattr(trace.language, "BLOCK", 64)
    r = replay_text(machine, "readl 0xfff00044\nOK 0x4f20\n" * 20, progress=True)
    assert r.ok
    err = capsys.readouterr().err
    assert "100.0% 20 requests" in err and "[####" in err and "  3 requests" not in err


# -- every trace in tests/traces: passes, and fails at the right line when mutated -----------
def _first_expectation(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        words = line.split("#")[0].split()
        if len(words) == 2 and words[0] == "OK" or len(words) == 3 and words[0] == "IRQ":
            return i
    return None


def mutate_first_expectation(text: str) -> tuple[str, int] | None:
    """Flip the first value reply (or IRQ line) of a trace; returns (text, its 1-based line), or
    None when the trace checks no value (a payload that only prints)."""
    lines = text.splitlines()
    i = _first_expectation(lines)
    if i is None:
        return None
    words = lines[i].split("#")[0].split()
    if words[0] == "IRQ":
        lines[i] = f"IRQ {'lower' if words[1] == 'raise' else 'raise'} {words[2]}"
    elif words[1].startswith("0x"):
        lines[i] = f"OK {int(words[1], 16) ^ 1:#x}"
    else:
        lines[i] = "OK " + ("AAAA" if words[1] != "AAAA" else "AAAB")      # b64read / endianness
    return "\n".join(lines) + "\n", i + 1


def check_trace_and_mutant(text: str, name: str, replay_original: bool = True) -> None:
    if replay_original:
        r = replay_fresh(text, name=name)
        assert r.ok, r.message
    mutated = mutate_first_expectation(text)
    if mutated is None:
        return
    mutant, line = mutated
    r = replay_fresh(mutant, name=name)
    assert (r.status, r.line) == (1, line), r.message
    assert r.message.startswith(f"{name}:{line}: expected ")


@pytest.mark.parametrize("path", TRACES, ids=[p.name for p in TRACES])
def test_trace_replays_and_its_mutant_fails_at_the_line(path):
    check_trace_and_mutant(path.read_text(), path.name)


# -- the command line --------------------------------------------------------------------------
def test_cli_replay_exit_codes_and_messages(tmp_path, capsys):
    good = tmp_path / "good.qtrace"
    good.write_text("readl 0xfff00044\nOK 0x4f20\n")
    assert cli.main(["replay", str(good)]) == 0
    bad = tmp_path / "bad.qtrace"
    bad.write_text("readl 0xfff00044\nOK 0x4f21\n")
    assert cli.main(["replay", str(bad)]) == 1
    assert re.search(r"bad\.qtrace:2: expected OK 0x4f21, got OK 0x0+4f20", capsys.readouterr().err)
    broken = tmp_path / "broken.qtrace"
    broken.write_text("readl 0xfff00044\nwritel what\n")
    assert cli.main(["replay", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.qtrace:2: " in err and "Traceback" not in err
    assert cli.main(["replay", str(tmp_path / "missing.qtrace")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["replay", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["line"] == 2 and out["status"] == 1 and out["counts"]["requests"] == 1


def test_cli_p2m_option_overrides_the_header(tmp_path):
    p = tmp_path / "t.qtrace"
    p.write_text("# p2m: scattered\nreadl 0x0c000020\nOK 0x2\n")
    assert cli.main(["replay", str(p)]) == 0
    assert cli.main(["replay", str(p), "--p2m", "direct"]) == 1


def test_cli_never_prints_a_traceback_for_garbage(tmp_path):
    p = tmp_path / "garbage.qtrace"
    p.write_bytes(b"\xff\xfe\x00binary\x01\nreadl 0x0\n")
    proc = subprocess.run([sys.executable, "-m", "vmm", "replay", str(p)], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "garbage.qtrace:1: " in proc.stderr and "Traceback" not in proc.stderr


# -- the pytest plugin -------------------------------------------------------------------------
def test_fixtures(machine, run_guest, replay):
    assert machine.mmio_read(0xFFF00044, 4) == 0x4F20
    res = run_guest("hello", backend="emulated")
    assert res.status == 0 and b"Hello" in res.console
    assert replay("readl 0xfff00044\nOK 0x4f20\n").ok
    assert replay(TRACES[0]).ok


@pytest.mark.machine(p2m="scattered")
def test_machine_marker(machine):
    assert machine.board.p2m == "scattered"


def test_qtrace_files_become_test_items(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "good.qtrace").write_text("# board: rcar-virt\nreadl 0xfff00044\nOK 0x4f20\n")
    (traces / "bad.qtrace").write_text("readl 0xfff00044\n\nOK 0x4f21\n")
    (traces / "skipped.qtrace").write_text("# skip: not yet\nreadl 0x0\n")
    (traces / "unbuildable.qtrace").write_text("# board: no-such-board\nreadl 0x0\n")   # fails alone
    (traces / "empty.qtrace").write_text("# nothing\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO),
                                                                             "PATH": "/usr/bin:/bin"})
    out = proc.stdout
    assert "3 failed, 1 passed, 1 skipped" in out, out
    assert "bad.qtrace:3: expected OK 0x4f21, got OK 0x0000000000004f20" in out
    assert "unbuildable.qtrace: " in out and "no-such-board" in out
    assert "empty.qtrace: the trace holds no requests" in out
    assert "Traceback" not in out
