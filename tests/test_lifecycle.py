"""A machine's life: one run, then close; resources given back; logs that stay readable; and the
isolation watchdog silent for every payload and trace that behaves."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.machine import Machine, MachineError
from vmm.trace import replay_fresh

TRACES = sorted((Path(__file__).parent / "traces").glob("*.qtrace"))


def test_a_machine_runs_once_and_says_so():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        assert m.run("exitcode", backend="emulated").status == 42
        with pytest.raises(MachineError, match="already ran a payload; build a new Machine"):
            m.run("hello", backend="emulated")
    with pytest.raises(MachineError, match="closed"):
        m.run("hello", backend="emulated")
    with pytest.raises(MachineError, match="closed"):
        m.mmio_read(0x0C000000, 4)
    with pytest.raises(MachineError, match="closed"):
        m.read_guest(0, 4)


def test_close_gives_the_memfd_back():
    code = ("import resource, logging; logging.disable(logging.WARNING)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "from vmm.machine import Machine\n"
            "for _ in range(120):\n"
            "    with Machine.from_board('rcar-virt') as m:\n"
            "        assert m.dma('dma3', 0x1000, 0x2000, 64) == (0, 0)\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_an_unknown_dma_engine_is_a_clear_error():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        with pytest.raises(ValueError, match=r"no dma engine 'nosuch' on rcar-virt \(engines: dma0, dma1, dma2, "
                                             r"dma3, dma4\)"):
            m.dma("nosuch", 0, 0, 1)


def test_the_unprotected_master_warning_appears_once_even_when_recording(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vmm", "run", "hello", "--backend", "emulated", "--record",
                          str(tmp_path / "h.qtrace")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("unprotected master: dma3") == 1


def test_repeated_warnings_are_summarised(tmp_path):
    trace = tmp_path / "noise.qtrace"
    trace.write_text("".join(f"writel {0x0D000000 + 4 * i:#x} 0x1\nOK\n" for i in range(200)))
    res = subprocess.run([sys.executable, "-m", "vmm", "replay", str(trace)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    unclaimed = [ln for ln in res.stderr.splitlines() if "unclaimed mmio write" in ln]
    assert len(unclaimed) == 11                                  # ten shown, one summary
    assert unclaimed[-1] == "vmm: 190 more warning(s) like: unclaimed mmio write of 4 bytes at 0xd000028 (dropped)"


@pytest.mark.parametrize("image, p2m", [
    ("demo", "direct"), ("demo", "scattered"), ("ipmmu_linux", "direct"), ("ipmmu_xen", "scattered"),
    ("virtio_iommu_smoke", "direct"), ("virtio_iommu_smoke", "scattered"), ("p2m_agree", "scattered"),
])
def test_the_watchdog_is_silent_for_the_payloads(image, p2m):
    with Machine.from_board("rcar-virt", p2m=p2m, quiet=True) as m:
        status = m.run(image, backend="emulated").status
        assert status == 0 and m.crossings == {}, (status, m.crossings)


@pytest.mark.parametrize("trace", TRACES, ids=[t.name for t in TRACES])
def test_the_watchdog_is_silent_for_the_traces(trace):
    result = replay_fresh(trace)
    assert result.ok and result.crossings == {}, (result.message, result.crossings)


def test_the_fd_count_does_not_grow_with_machines():
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        Machine.from_board("rcar-virt", quiet=True).close()
    assert len(os.listdir("/proc/self/fd")) <= before
