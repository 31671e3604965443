"""The virtio_iommu_pasid payload on both backends and both P2M layouts, and the demo's PASID
section. KVM cases skip with the reason when /dev/kvm is not usable."""
from __future__ import annotations

import pytest
from support import BACKENDS, ensure_payloads
from support import run_payload as run


@pytest.fixture(scope="module", autouse=True)
def built():
    ensure_payloads("virtio_iommu_pasid", "demo")


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
