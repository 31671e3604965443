"""The hand-written qtest traces of the Linux and Xen IPMMU sequences (tests/traces/ipmmu_*.qtrace).

They are checked twice: by a minimal in-test interpreter of the subset they use (so the traces are
known good against the model on their own), and by ``vmm replay`` (DESIGN.md section 4) when the
replayer is present."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import Machine

TRACES = sorted((Path(__file__).parent / "traces").glob("ipmmu_*.qtrace"))
SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}


def run_subset(m: Machine, path: Path) -> int:
    """Replay writeX/readX/write/read with OK and IRQ expectations; returns the lines checked."""
    edges: list[tuple[str, int]] = []
    m.irqs.listeners.append(lambda line, level: edges.append(("raise" if level else "lower", line)))
    pending: list[tuple[str, int]] = []          # edges the last request produced, not yet matched
    last = None
    checked = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        word, *args = line.split()
        where = f"{path.name}:{n}"
        if word == "OK":
            assert last is not None, where
            if args:
                assert int(args[0], 16) == last, f"{where}: expected {args[0]}, got {last:#x}"
                checked += 1
            continue
        if word == "IRQ":
            assert pending and pending[0] == (args[0], int(args[1])), f"{where}: expected IRQ {args}, got {pending}"
            pending.pop(0)
            checked += 1
            continue
        assert not pending, f"{where}: unexpected IRQ edges {pending}"
        edges.clear()
        if word[:-1] in ("write", "read") and word[-1] in SIZES:
            size, addr = SIZES[word[-1]], int(args[0], 16)
            if word.startswith("write"):
                m.mmio_write(addr, size, int(args[1], 16))
                last = None
            else:
                last = m.mmio_read(addr, size)
        elif word == "write":
            addr, size, data = int(args[0], 16), int(args[1], 0), bytes.fromhex(args[2][2:])
            assert len(data) == size, where
            m.dom0.write(addr, data)
            last = None
        elif word == "read":
            addr, size = int(args[0], 16), int(args[1], 0)
            last = int.from_bytes(m.dom0.read(addr, size), "big")     # qtest prints bytes in order
        else:
            raise AssertionError(f"{where}: {word} is not in the subset")
        pending = list(edges)
    assert not pending, f"{path.name}: unexpected IRQ edges at the end {pending}"
    return checked


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_trace_holds_against_the_model(trace):
    m = Machine.from_board("rcar-virt")
    try:
        assert run_subset(m, trace) > 20
    finally:
        m.close()


@pytest.mark.skipif(importlib.util.find_spec("vmm.trace") is None, reason="the replayer (vmm/trace.py) is not here yet")
@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.name)
def test_vmm_replay_accepts_the_trace(trace):
    r = subprocess.run([sys.executable, "-m", "vmm", "replay", str(trace)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
