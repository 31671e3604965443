"""Fault explanations: every refused DMA can say which master, which address, and, for a walk,
which table and descriptor at each level refused it (both stages when nested)."""
from __future__ import annotations

import pytest
from test_ipmmu_support import Rig, Tables
from virtio_driver import VirtioDriver

from vmm.board import load_board
from vmm.machine import Machine


@pytest.fixture
def m():
    with Machine.from_board("rcar-virt", quiet=True) as m:
        yield m


def test_stage1_permission_fault_names_the_leaf(m):
    rig, t = Rig(m), Tables(m)
    rig.linux_context(1, t.root)
    leaf = t.map(0x1000_0000, 0x20_0000, ro=True)
    assert m.dma("dma0", 0x1000_0000, 0x1000_0010, 8) == (3, 0x1000_0010)
    (e,) = m.faults()
    assert (e["iommu"], e["master"], e["iova"], e["access"], e["status"]) == \
        ("ipmmu_mm", "dma0", "0x10000010", "write", 3)
    assert e["context"].startswith("context 1 (stage 1;") and "ERRCODE 4, ERRLVL 3" in e["reason"]
    assert [(s["stage"], s["level"]) for s in e["walk"]] == [(1, 1), (1, 2), (1, 3)]
    last = e["walk"][-1]
    assert last["address"] == f"{leaf:#x}" and last["fields"]["AP[2] read-only"] == 1
    assert last["fields"]["output"] == "0x200000"
    assert last["verdict"].startswith("permission fault")
    assert all(s["verdict"] == "ok" for s in e["walk"][:-1])
    text = m.fault_log[-1].text()
    assert text.splitlines()[0].startswith("fault: dma0 write at 0x10000010 via ipmmu_mm context 1")
    assert len(text.splitlines()) == 4


def test_stage1_translation_fault_names_the_invalid_descriptor(m):
    rig, t = Rig(m), Tables(m)
    rig.linux_context(1, t.root)
    t.map(0x1000_0000, 0x20_0000)
    assert m.dma("dma0", 0x1000_7000, 0x1000_0000, 8) == (2, 0x1000_7000)
    e = m.faults()[-1]
    assert e["walk"][-1]["level"] == 3 and e["walk"][-1]["fields"] == {"valid": 0}
    assert e["walk"][-1]["verdict"] == "translation fault: descriptor not valid"


@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_stage2_fault_walks_the_p2m(p2m):
    with Machine.from_board("rcar-virt", p2m=p2m, quiet=True) as m:
        Rig(m).xen_context(1, m.dom0.p2m.root)
        assert m.dma("dma0", 0xB00_0010, 0x1000, 8) == (2, 0xB00_0010)
        e = m.faults()[-1]
        assert e["context"].startswith("context 1 (stage 2;")
        assert e["walk"][0]["table"] == f"{m.dom0.p2m.root:#x}" and e["walk"][0]["stage"] == 2
        assert e["walk"][-1]["fields"] == {"valid": 0} and "ERRCODE 1" in e["reason"]


def test_virtio_iommu_fault_says_what_is_mapped(m):
    d = VirtioDriver(m).init()
    assert d.attach(1, 2) == 0
    assert d.map(1, 0x10_0000, 0x10_0FFF, 0x20_0000, 1) == 0              # READ only
    m.mmio_write(0x0B002000 + 0x08, 8, 0x10_0000)
    assert m.dma("dma2", 0x10_0000, 0x10_0040, 16) == (3, 0x10_0040)
    e = m.faults()[-1]
    assert e["iommu"] == "virtio0" and e["master"] == "dma2" and e["context"] == "endpoint 2"
    assert "mapping [0x100000, 0x100fff] -> 0x200000 of domain 1" in e["reason"] and "no WRITE" in e["reason"]
    assert m.dma("dma2", 0x30_0123, 0x10_0040, 16) == (2, 0x30_0123)
    e = m.faults()[-1]
    assert "no mapping of domain 1 covers IOVA 0x300123" in e["reason"]
    assert "the nearest below is [0x100000, 0x100fff]" in e["reason"] and "reason MAPPING" in e["reason"]


def test_p2m_refusal_behind_the_virtio_iommu_is_walked(m):
    d = VirtioDriver(m).init()
    assert d.attach(1, 2) == 0
    assert d.map(1, 0x10_0000, 0x10_0FFF, 0xB00_0000, 3) == 0             # a GPA that is not RAM
    assert m.dma("dma2", 0x10_0010, 0x1000, 8) == (2, 0x10_0010)
    e = m.faults()[-1]
    assert e["iommu"] == "P2M" and "guest-physical address 0xb000010" in e["reason"]
    assert e["walk"] and e["walk"][-1]["stage"] == 2


def test_unprotected_and_isolation_refusals_are_explained():
    b = load_board("rcar-virt")
    b.unprotected, b.isolation = "bypass", "fault"
    with Machine(b, quiet=True) as m:
        root = m.dom0.p2m.root
        assert m.dma("dma3", 0x1000, root + 8, 8) == (8, root + 8)
        e = m.faults()[-1]
        assert e["iommu"].startswith("no IOMMU") and e["status"] == 8
        assert "owned by the hypervisor" in e["reason"]
