"""Guest payloads for virtio-iommu: the smoke driver on both backends and both P2M layouts, the
demo section, and the bench payload (checks only; figures come from bench/virtio_iommu.py).
KVM cases skip with the reason when /dev/kvm is not usable."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import BACKENDS, ensure_payloads
from support import run_payload as run

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guest_images"


@pytest.fixture(scope="module", autouse=True)
def built():
    ensure_payloads("virtio_iommu_smoke", "demo", "virtio_iommu_bench")


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
