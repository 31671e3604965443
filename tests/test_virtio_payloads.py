"""Guest payloads for virtio-iommu: the smoke driver on both backends and both P2M layouts, the
demo section, and the bench payload (checks only; figures come from bench/virtio_iommu.py).
KVM cases skip with the reason when /dev/kvm is not usable."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import BACKENDS

from vmm.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guest_images"


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build the payloads when a toolchain is there (a no-op when they are up to date)."""
    if shutil.which("make") and shutil.which("gcc"):
        subprocess.run(["make", "-s", "-C", str(GUESTS), "out/virtio_iommu_smoke.elf", "out/demo.elf",
                        "out/virtio_iommu_bench.elf"], check=True)
    for name in ("virtio_iommu_smoke", "demo", "virtio_iommu_bench"):
        if not (GUESTS / "out" / f"{name}.elf").is_file():
            pytest.skip(f"{name}.elf not built and no toolchain to build it")


def run(image: str, backend: str, p2m: str = "direct"):
    m = Machine.from_board("rcar-virt", p2m=p2m)
    try:
        return m.run(image, backend=backend, timeout=60)
    finally:
        m.close()


@pytest.mark.parametrize("p2m", ["direct", "scattered"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_smoke_payload(backend, p2m):
    r = run("virtio_iommu_smoke", backend, p2m)
    text = r.console.decode(errors="replace")
    assert r.status == 0, text
    assert "FAIL" not in text and "0 failures" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_has_a_passing_virtio_section(backend):
    r = run("demo", backend)
    text = r.console.decode(errors="replace")
    assert r.status == 0, text
    assert "== virtio-iommu ==" in text
    assert "fault event: reason 2" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_payload_checks_pass(backend):
    r = run("virtio_iommu_bench", backend)
    text = r.console.decode(errors="replace")
    assert r.status == 0, text
    assert "BENCH requests 131072 batch 64" in text


def test_cli_exit_status():
    """`vmm run virtio_iommu_smoke` exits with the payload's failure count (0)."""
    res = subprocess.run([sys.executable, "-m", "vmm", "run", "virtio_iommu_smoke", "--backend", "emulated",
                          "--p2m", "scattered"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr
