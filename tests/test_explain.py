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


def _vmm(*args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "vmm", *args], capture_output=True, text=True, timeout=120)


def test_cli_explains_faults_of_a_run_and_a_replay(tmp_path):
    run = _vmm("run", "ipmmu_linux", "--backend", "emulated", "--explain-faults")
    assert run.returncode == 0, run.stderr
    faults = [ln for ln in run.stderr.splitlines() if ln.startswith("fault: ")]
    assert faults[0].startswith("fault: dma0 write at 0x10200040 via ipmmu_mm context 1 (stage 1;")
    assert "  stage 1 level 3: " in run.stderr and "-> permission fault" in run.stderr
    js = _vmm("run", "ipmmu_linux", "--backend", "emulated", "--json")
    import json
    summary = json.loads(js.stdout.strip().splitlines()[-1])
    assert summary["fault_count"] == len(faults) and summary["faults"][0]["iova"] == "0x10200040"
    assert summary["isolation_crossings"] == {}
    rep = _vmm("replay", "tests/traces/ipmmu_xen.qtrace", "--explain-faults")
    assert rep.returncode == 0, rep.stderr
    assert "tests/traces/ipmmu_xen.qtrace: fault: dma0 read at 0xb000000 via ipmmu_mm context 1 (stage 2;" \
        in rep.stderr
    assert "  stage 2 level 2: " in rep.stderr


def test_vmm_info_board_shows_the_map_and_topology():
    import json
    text = _vmm("info", "--board", "rcar-virt")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "  0000000000000000-0000000007ffffff ram (dom0, direct-mapped)" in lines
    assert "  00000000e67b0000-00000000e67b0fff ipmmu_mm: ipmmu, irq 0" in lines
    assert "  000000000a000000-000000000a0001ff virtio0: virtio-mmio [virtio-iommu], irq 16" in lines
    assert "  dma0     (dma, domain dom0, 32-bit) -> ipmmu_ds1 uTLB 32" in lines
    assert "  dma3     (dma, domain dom0, 32-bit) behind no IOMMU (bypass)  <-- UNPROTECTED" in lines
    assert "  dma4     (dma, domain dom0, 40-bit) -> ipmmu_ds0 uTLB 0" in lines
    data = json.loads(_vmm("info", "--board", "rcar-virt", "--ram", "256M", "--json").stdout)
    assert data["ram"][1] == {"domain": "dom0", "gpa": 1 << 32, "size": (256 << 20) - 0x0A000000, "direct": True}
    assert [m["name"] for m in data["masters"] if m["iommu"] is None] == ["dma3"]
    assert {"name": "debug-exit", "port": 0xF4, "size": 4} in data["pio"]
