"""Traces against hostile input (issue 15, items 1-3): ranges checked before memory is spent,
strict numbers, system-memory addressing (RAM included) and streaming with bounded memory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import cli
from vmm.machine import Machine
from vmm.trace import parse, replay_fresh, replay_text

REPO = Path(__file__).resolve().parents[1]
SYSINFO = 0x0C000000
DMA3 = 0x0B003000


# -- item 1: ranges before memory ---------------------------------------------------------------
@pytest.mark.parametrize("line, why", [
    ("write 0x0 1073741824 0x00", "runs past the end of guest RAM at 0x8000000"),
    ("memset 0x0 1073741824 0", "runs past the end of guest RAM at 0x8000000"),
    ("memset 0x20000000 0x10 0", "neither guest RAM of dom0"),
    ("b64write 0xf0000000 4 AAAAAA==", "neither guest RAM of dom0"),
    ("read 0x7fffffe 4", "runs past the end of guest RAM"),
    ("write 0x0c000ffe 4 0x00", "runs past the end of device window sysinfo"),
    ("memset 0xffffffffffffff00 0x1000 0", "neither guest RAM of dom0"),
])
def test_bulk_requests_outside_ram_and_windows_are_errors_at_their_line(machine, line, why):
    r = replay_text(machine, f"readl {SYSINFO:#x}\n{line}\nOK\n", "t")
    assert (r.ok, r.status, r.line) == (False, 2, 2), r.message
    assert r.message.startswith(f"t:2: {line}: ") and why in r.message


def test_huge_writes_expected_to_fail_allocate_nothing():
    """Eight 1 GiB writes (each expected to FAIL) under a 2.5 GiB address-space limit: before,
    each allocated its gigabyte first."""
    text = ("write 0x0 1073741824 0x00\nFAIL\n" * 8
            + "memset 0x20000000 0x40000000 0\nFAIL\nreadl 0xfff00044\nOK 0x4f20\n")
    code = ("import resource, sys, logging; logging.getLogger('vmm').setLevel(logging.ERROR);"
            "resource.setrlimit(resource.RLIMIT_AS, (5 << 29, 5 << 29));"
            "from vmm.trace import replay_fresh; r = replay_fresh(sys.argv[1]);"
            "print(r.status, r.message)")
    out = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split()[:1] == ["0"], out.stdout + out.stderr


def test_short_write_data_zero_fills_and_memset_fills_in_chunks(machine):
    machine.write_guest(0x200000, b"\xff" * 16)
    r = replay_text(machine, "write 0x200000 16 0x1122\nmemset 0x400000 0x300000 0xab\n"
                             "read 0x200000 16\nOK 0x11220000000000000000000000000000\n")
    assert r.ok, r.message
    assert machine.read_guest(0x400000, 0x300000) == b"\xab" * 0x300000
    assert machine.read_guest(0x6FFFFF, 2) == b"\xab\x00"


def test_a_line_longer_than_the_limit_is_an_error_not_a_memory_hog(tmp_path):
    p = tmp_path / "sparse.qtrace"
    with open(p, "wb") as f:                      # 10 GB of NULs, no newline: nothing on disk
        f.truncate(10 << 30)
    assert cli.main(["replay", str(p)]) == 2
    r = replay_fresh(Path("/dev/zero"))
    assert (r.status, r.line) == (2, 1) and "longer than 8 MiB" in r.message


def test_memory_does_not_grow_with_trace_length(tmp_path):
    """Peak RSS of a replay of 1.6 M lines is that of 200 k lines (before: 1.7 GB for 50 MB)."""
    pattern = f"readl {SYSINFO:#x}\nOK 0x4f464e49\nwritel {DMA3 + 0x08:#x} 0x1000\nOK\n"
    small, big = tmp_path / "small.qtrace", tmp_path / "big.qtrace"
    small.write_text(pattern * 50_000)
    big.write_text(pattern * 400_000)
    code = ("import resource, sys, logging; logging.getLogger('vmm').setLevel(logging.ERROR);"
            "from vmm.trace import replay_fresh; r = replay_fresh(sys.argv[1]); assert r.ok, r.message;"
            "print(r.counts['lines'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss = {}
    for p in (small, big):
        out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout.split()
        rss[p.name] = int(out[1])
    assert int(out[0]) == 1_600_000
    assert rss["big.qtrace"] < rss["small.qtrace"] + 16 * 1024, rss          # KiB


# -- item 2: strict where QEMU is ---------------------------------------------------------------
def test_a_utf8_byte_order_mark_is_accepted(machine, tmp_path):
    assert replay_text(machine, "\ufeffreadl 0xfff00044\nOK 0x4f20\n").ok
    p = tmp_path / "bom.qtrace"
    p.write_bytes(b"\xef\xbb\xbf# p2m: direct\r\nreadl 0xfff00044\r\nOK 0x4f20\r\n")
    assert cli.main(["replay", str(p)]) == 0


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# board: rcar-virt\n", "\ufeff"])
def test_an_empty_trace_says_it_held_no_requests(machine, text, tmp_path, capsys):
    r = replay_text(machine, text, "e.qtrace")
    assert (r.ok, r.status) == (False, 2) and "holds no requests" in r.message
    p = tmp_path / "e.qtrace"
    p.write_text(text)
    assert cli.main(["replay", str(p)]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "holds no requests" in err[0]


def _errors(stderr: str) -> list[str]:
    """stderr without the board's start-up warning (every rcar-virt machine has an unprotected master)."""
    return [ln for ln in stderr.strip().splitlines() if not ln.startswith("vmm: unprotected master:")]


def test_strict_numbers_exit_2_with_the_line(tmp_path, capsys):
    for line in ("read 0x1000 -1", "memset 0x1000 -5 1", "readl -4", "readl 0x10000000000000000", "readl 1_000"):
        p = tmp_path / "n.qtrace"
        p.write_text(f"readl 0xfff00044\nOK 0x4f20\n{line}\n")
        assert cli.main(["replay", str(p)]) == 2, line
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith(f"{p}:3: "), err


def test_parse_keeps_requests_and_header():
    t = parse("# ram: 64M\nreadl 0x10\nOK 0x5\nwrite 0x1000 4 0x11\n")
    assert t.header == {"ram": "64M"} and [r.cmd for r in t.requests] == ["readl", "write"]
    assert t.requests[0].expect == 5 and t.lines == 4


# -- item 3: width accesses address RAM too ------------------------------------------------------
@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_writel_and_readl_reach_guest_ram_as_the_cpu_sees_it(p2m):
    m = Machine.from_board("rcar-virt", p2m=p2m)
    try:
        r = replay_text(m, "writel 0x1000 0x12345678\nOK\nreadl 0x1000\nOK 0x12345678\n"
                           "writeb 0x1001 0xab\nreadw 0x1000\nOK 0xab78\n"
                           "writeq 0x2000 0x1122334455667788\nreadb 0x2007\nOK 0x11\n"
                           "read 0x1000 4\nOK 0x78ab3412\n")
        assert r.ok, r.message
        assert m.read_guest(0x1000, 4) == bytes.fromhex("78ab3412")
        assert m.read_guest(0x2000, 8) == (0x1122334455667788).to_bytes(8, "little")
        r = replay_text(m, "readl 0x1000\nOK 0x12345678\n", "t")
        assert (r.status, r.line) == (1, 2) and "got OK 0x000000001234ab78" in r.message
    finally:
        m.close()


def test_bulk_requests_reach_device_windows(machine):
    r = replay_text(machine, f"read {SYSINFO:#x} 4\nOK 0x494e464f\n"                  # "INFO"
                             f"b64read {SYSINFO:#x} 4\nOK SU5GTw==\n"
                             f"write {DMA3 + 0x08:#x} 8 0x0010000000000000\n"
                             f"readq {DMA3 + 0x08:#x}\nOK 0x1000\n"
                             f"memset {DMA3 + 0x10:#x} 8 0x20\nreadq {DMA3 + 0x10:#x}\nOK 0x2020202020202020\n")
    assert r.ok, r.message


def test_width_access_in_a_hole_reads_zero_as_on_the_bus(machine):
    r = replay_text(machine, "readl 0x20000000\nOK 0x0\nwritel 0x20000000 0x5\nOK\n")
    assert r.ok, r.message
