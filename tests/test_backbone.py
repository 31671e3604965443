"""The harness backbone: booting payloads on both backends, exits, crashes, access widths."""
from __future__ import annotations

import subprocess
import sys

import pytest
from support import BACKENDS, RecordingDevice

from vmm import Machine
from vmm.backends import EXIT_CRASHED, EXIT_HALTED, EXIT_TIMEOUT

TESTDEV = 0x0D000000


def boot(image: str, backend: str, **kw):
    m = Machine.from_board("rcar-virt", **kw)
    try:
        return m, m.run(image, backend=backend, timeout=kw.pop("timeout", 10.0))
    finally:
        m.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hello_prints_and_exits(backend):
    _, r = boot("hello", backend)
    assert (r.status, r.reason, r.backend) == (0, "exit", backend)
    text = r.console.decode()
    assert "Hello from iommu-lab" in text
    assert "magic 0x336ec578 version 1" in text          # the loader's hvm_start_info reached the guest
    assert "0000000000000000-0000000008000000 type 1" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_code_propagates(backend):
    _, r = boot("exitcode", backend)
    assert r.status == 42 and r.reason == "exit"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_demo_passes(backend, p2m):
    m = Machine.from_board("rcar-virt", p2m=p2m)
    r = m.run("demo", backend=backend)
    m.close()
    assert r.status == 0, r.console.decode()[-2000:]
    assert "FAIL" not in r.console.decode()
    assert ("flags 0x1" if p2m == "direct" else "flags 0x2") in r.console.decode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_triple_fault_is_reported(backend):
    _, r = boot("triple", backend)
    assert r.status == EXIT_CRASHED and r.reason == "triple-fault"
    assert "triple-fault" in r.message and "RIP=0x" in r.message and "CR0=" in r.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_halt_with_interrupts_off_ends_the_run(backend):
    _, r = boot("halt", backend)
    assert r.status == EXIT_HALTED and r.reason == "halt"
    assert "halted with interrupts off" in r.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_stops_a_runaway_guest(backend):
    m = Machine.from_board("rcar-virt")
    r = m.run("spin", backend=backend, timeout=0.5)
    m.close()
    assert r.status == EXIT_TIMEOUT and r.reason == "timeout"
    assert "after 0.5 s" in r.message and b"spinning" in r.console


EXPECTED_WIDTHS = [
    ("w", 0x0, 1, 0x11), ("w", 0x2, 2, 0x2233), ("w", 0x4, 4, 0x44556677), ("w", 0x8, 8, 0x8899AABBCCDDEEFF),
    ("r", 0x0, 1, 0x11), ("r", 0x2, 2, 0x2233), ("r", 0x4, 4, 0x44556677), ("r", 0x8, 8, 0x8899AABBCCDDEEFF),
    ("r", 0x10, 8, 0),
]


def widths_log(backend):
    m = Machine.from_board("rcar-virt")
    dev = RecordingDevice()
    m.mmio.add(TESTDEV, 0x1000, dev, "testdev")
    r = m.run("mmio_widths", backend=backend)
    m.close()
    assert r.status == 0
    assert "r64=0x8899aabbccddeeff" in r.console.decode()    # the merged 8-byte read reached the guest whole
    return dev.log


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmio_widths_reach_the_device_unsplit(backend):
    assert widths_log(backend) == EXPECTED_WIDTHS


def test_mmio_access_logs_identical_on_both_backends():
    from support import KVM_OK, KVM_WHY
    if not KVM_OK:
        pytest.skip(f"KVM unusable here: {KVM_WHY}")
    assert widths_log("kvm") == widths_log("emulated")


def test_cli_run_exit_status_and_console():
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "exitcode", "--backend", "emulated"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 42
    assert "exiting with status 42" in r.stdout


def test_cli_run_default_boots_demo():
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "--backend", "emulated"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done:" in r.stdout and "0 failures" in r.stdout


def test_cli_json_summary():
    import json
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "hello", "--backend", "emulated", "--json"],
                       capture_output=True, text=True, timeout=60)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["status"] == 0 and summary["backend"] == "emulated"
    assert "Hello from iommu-lab" in summary["console"]


def test_cli_timeout_status():
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "spin", "--backend", "emulated", "--timeout", "0.3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_TIMEOUT
    assert "still running after 0.3 s" in r.stderr


def test_auto_backend_says_which_it_chose():
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "hello"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "backend: kvm" in r.stderr or "backend: emulated" in r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_satisfy_the_cpu_backend_protocol(backend):
    from vmm.backends import CpuBackend
    from vmm.runner import choose_backend

    m = Machine.from_board("rcar-virt")
    try:
        cpu = choose_backend(backend)(m)
        try:
            assert isinstance(cpu, CpuBackend)
            assert cpu.name == backend
            assert "RIP=" in cpu.describe_cpu()
            assert cpu.dirty_pages() == []        # not recording: nothing tracked
        finally:
            cpu.close()
    finally:
        m.close()


def test_emulated_choice_does_not_import_kvm_and_kvm_choice_does_not_import_unicorn():
    code = "import sys; from vmm.runner import choose_backend; choose_backend({!r}); print({!r} in sys.modules)"
    for chosen, absent in (("emulated", "vmm.backends.kvm"), ("kvm", "unicorn"), ("kvm", "vmm.backends.emulated")):
        out = subprocess.run([sys.executable, "-c", code.format(chosen, absent)],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "False", (chosen, absent, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accesses_past_a_small_device_are_unclaimed_and_reads_are_masked(backend):
    """A 12-byte device: the 8-byte accesses at +8 and +0x10 cross its end, so the bus leaves them
    unclaimed (reads 0, writes dropped); values a device returns wider than the access are cut."""
    m = Machine.from_board("rcar-virt")
    dev = RecordingDevice(reads={0x0: 0x1FF, 0x2: -1, 0x4: (1 << 70) | 0x12345678})
    m.mmio.add(TESTDEV, 0xC, dev, "small")
    try:
        r = m.run("mmio_widths", backend=backend)
    finally:
        m.close()
    assert r.status == 0
    assert [e[:3] for e in dev.log] == [("w", 0x0, 1), ("w", 0x2, 2), ("w", 0x4, 4),
                                        ("r", 0x0, 1), ("r", 0x2, 2), ("r", 0x4, 4)]
    text = r.console.decode()
    for line in ("r8=0xff", "r16=0xffff", "r32=0x12345678", "r64=0x0000000000000000", "r64b=0x0000000000000000"):
        assert line in text, text


class Exploding:
    def read(self, offset: int, size: int) -> int:
        raise RuntimeError(f"device bug at +{offset:#x}")

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_device_exception_reaches_the_caller(backend):
    m = Machine.from_board("rcar-virt")
    m.mmio.add(TESTDEV, 0x1000, Exploding(), "exploding")
    try:
        with pytest.raises(RuntimeError, match="device bug at"):
            m.run("mmio_widths", backend=backend)
    finally:
        m.close()
