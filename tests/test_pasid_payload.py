"""The virtio_iommu_pasid payload on both backends and both P2M layouts, and the demo's PASID
section. KVM cases skip with the reason when /dev/kvm is not usable."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import BACKENDS

from vmm.machine import Machine

GUESTS = Path(__file__).resolve().parent.parent / "guest_images"


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which("make") and shutil.which("gcc"):
        subprocess.run(["make", "-s", "-C", str(GUESTS), "out/virtio_iommu_pasid.elf", "out/demo.elf"], check=True)
    for name in ("virtio_iommu_pasid", "demo"):
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
def test_pasid_payload(backend, p2m):
    r = run("virtio_iommu_pasid", backend, p2m)
    text = r.console.decode(errors="replace")
    assert r.status == 0, text
    assert "FAIL" not in text and "176 checks, 0 failures" in text
    for section in ("linear CD table", "4 KiB leaves", "64 KiB leaves", "request statuses"):
        assert section in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_has_a_passing_pasid_section(backend):
    r = run("demo", backend)
    text = r.console.decode(errors="replace")
    assert r.status == 0, text
    assert "== virtio-iommu PASID tables ==" in text
    assert "pasid 7" in text
