"""A stock Debian cloud kernel boots on the emulated backend to its busybox /init, which prints a
marker and /proc/interrupts and ends the run through port 0xF4 (status 42); with `lab.shell` a
shell on ttyS0 answers input fed to the UART. The kernel and initramfs come from
`make linux-guest` (apt-get download from the Debian archive); without them, and without apt to
fetch them, the tests skip saying so."""
from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest

from vmm import Machine

LINUX = Path(__file__).resolve().parents[1] / "guest_images" / "linux"
KERNEL, INITRD = LINUX / "out" / "vmlinuz", LINUX / "out" / "initramfs.cpio.gz"
CMDLINE = "console=ttyS0 lpj=4000000 tsc_early_khz=2400000 tsc=reliable clocksource=tsc acpi=off"


@pytest.fixture(scope="module")
def linux_guest():
    if not (KERNEL.is_file() and INITRD.is_file()):
        try:
            p = subprocess.run(["make", "-s", "-C", str(LINUX)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"make linux-guest could not run: {e}")
        if p.returncode:
            why = (p.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"make linux-guest failed (apt cannot reach the Debian archive?): {why}")
    return str(KERNEL), str(INITRD)


def boot(linux_guest, cmdline: str = CMDLINE, answer: bytes | None = None):
    """Boot once; a boot that stops by timeout (seen once in many runs of the full suite under load,
    never in 60 boots alone: an interrupt wake-up race not yet found) is tried once more, and the
    first attempt is reported as a warning so it stays visible."""
    r = _boot(linux_guest, cmdline, answer)
    if r.reason == "timeout":
        warnings.warn(f"linux boot timed out once and was retried: {r.message}", stacklevel=2)
        r = _boot(linux_guest, cmdline, answer)
    return r


def _boot(linux_guest, cmdline: str, answer: bytes | None):
    kernel, initrd = linux_guest
    m = Machine.from_board("rcar-virt", quiet=True)
    try:
        if answer is not None:
            uart = m.devices["com1"]
            seen = bytearray()

            def sink(data: bytes) -> None:            # type at the shell's first prompt
                seen.extend(data)
                if b"/ # " in seen and not uart.expect_input:
                    uart.expect_input = True
                    uart.feed(answer)
            m.console_sinks.append(sink)
        return m.run(kernel, backend="emulated", timeout=90, cmdline=cmdline, initrd=initrd)
    finally:
        m.close()


def test_debian_kernel_reaches_init_counts_timer_interrupts_and_exits(linux_guest):
    r = boot(linux_guest)
    text = r.console.decode("utf-8", "replace")
    assert (r.status, r.reason) == (42, "exit"), r.message + text[-3000:]
    assert "Run /init as init process" in text and "iommu-lab: linux init reached" in text
    timer = re.search(r"^\s*0:\s+(\d+)\s+XT-PIC\s+timer", text, re.M)
    assert timer and int(timer.group(1)) > 0, text[-2000:]
    assert re.search(r"^\s*4:\s+\d+\s+XT-PIC\s+ttyS0", text, re.M)
    assert "ttyS0 at I/O 0x3f8 (irq = 4" in text


def test_a_shell_on_ttys0_reads_the_uart(linux_guest):
    r = boot(linux_guest, CMDLINE + " lab.shell", answer=b"echo answer-$((6*7))\nexit\n")
    text = r.console.decode("utf-8", "replace")
    assert (r.status, r.reason) == (42, "exit"), r.message + text[-3000:]
    assert "answer-42" in text
