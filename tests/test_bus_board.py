"""Buses refuse overlaps and answer unclaimed accesses; boards reject nonsense with one line."""
from __future__ import annotations

import logging

import pytest
from support import RecordingDevice

from vmm import Machine
from vmm.board import BoardError, load_board, parse_board
from vmm.bus import Bus, BusError


def test_overlap_refused_at_build():
    bus = Bus("mmio")
    bus.add(0x1000, 0x100, RecordingDevice(), "a")
    bus.add(0x1100, 0x100, RecordingDevice(), "b")        # adjacent is fine
    with pytest.raises(BusError, match="overlaps a"):
        bus.add(0x10F0, 0x20, RecordingDevice(), "c")
    with pytest.raises(BusError, match="overlaps b"):
        bus.add(0x11F0, 0x20, RecordingDevice(), "d")
    with pytest.raises(BusError, match="overlaps a"):
        bus.add(0x0F00, 0x400, RecordingDevice(), "e")       # swallows a whole range


def test_dispatch_gives_offsets_and_masks_values():
    bus = Bus("mmio")
    dev = RecordingDevice(reads={0x10: 0x1_2345_6789})
    bus.add(0x4000, 0x100, dev, "dev")
    assert bus.read(0x4010, 4) == 0x2345_6789      # the bus masks to the access width
    bus.write(0x4020, 2, 0x1_BEEF)
    assert dev.log[-1] == ("w", 0x20, 2, 0xBEEF)


def test_unclaimed_reads_zero_and_logs_once_per_address(caplog):
    bus = Bus("mmio")
    with caplog.at_level(logging.WARNING, logger="vmm.bus"):
        assert bus.read(0x9000, 4) == 0
        assert bus.read(0x9000, 4) == 0
        bus.write(0x9000, 4, 1)
        bus.write(0x9008, 4, 1)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3
    assert "unclaimed mmio read of 4 bytes at 0x9000" in msgs[0]


def test_board_overlap_is_a_board_error():
    spec = load_board("rcar-virt")
    spec.devices.append({"type": "const", "name": "clash", "base": 0x0C000010, "value": 1})
    with pytest.raises(BoardError, match="clash.*overlaps sysinfo"):
        Machine(spec)


@pytest.mark.parametrize("data, words", [
    ({"p2m": "sideways"}, "p2m must be"),
    ({"unprotected": "maybe"}, "unprotected must be"),
    ({"ram": "12Q"}, "cannot read size"),
    ({"ram": "1M"}, "at least 2 MiB"),
    ({"device": [{"type": "warp-drive", "base": 0}]}, "unknown type"),
    ({"device": [{"type": "dma", "name": "x", "base": 0, "irq": 1, "iommu": "nowhere"}]}, "unknown IOMMU"),
    ({"bogus": 1}, "unknown board key"),
])
def test_bad_boards(data, words):
    with pytest.raises(BoardError, match=words):
        parse_board(data, "test.toml")


def test_board_device_missing_a_key_names_it():
    spec = load_board("rcar-virt")
    spec.devices.append({"type": "dma", "name": "dma9", "base": 0x0B009000})
    with pytest.raises(BoardError, match="device 'dma9' needs a value for 'irq'"):
        Machine(spec)


def test_unprotected_masters_logged_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="vmm"):
        m = Machine.from_board("rcar-virt")
    m.close()
    lines = [r.getMessage() for r in caplog.records if "unprotected master" in r.getMessage()]
    assert lines == ["unprotected master: dma3 (master 3) is behind no IOMMU; its DMA reaches machine "
                     "memory untranslated (bypass): it can reach the hypervisor's P2M tables and free memory "
                     "(isolation watchdog: warn)"]


def test_ram_above_the_device_window_continues_at_4g():
    m = Machine.from_board("rcar-virt", ram="256M")
    assert m.dom0.ram_ranges == [(0, 0x0A000000), (1 << 32, (256 << 20) - 0x0A000000)]
    m.write_guest((1 << 32) + 0x1000, b"high")
    assert m.memory.read((1 << 32) + 0x1000, 4) == b"high"     # direct: GPA == MPA
    m.close()


def test_scattered_ram_beyond_the_mapping_limit_is_one_line():
    from vmm.guestram import mapping_budget
    budget = mapping_budget()
    pages = (1 << 30) // 4096                     # 1 GiB scattered: 262,144 mappings
    if budget is None or budget[0] > 2 * pages:
        pytest.skip(f"vm.max_map_count here ({budget and budget[0]}) allows a 1 GiB scattered guest")
    with pytest.raises(BoardError, match=r"vm.max_map_count is \d+ .*sysctl -w vm.max_map_count="):
        Machine.from_board("rcar-virt", p2m="scattered", ram="1G")
    # without a CPU view (replay, recording twins) the same machine needs no host mappings at all
    with Machine.from_board("rcar-virt", p2m="scattered", ram="1G", cpu=False, quiet=True) as m:
        m.write_guest((1 << 32) + 0x1000_0000, b"deep")
        assert m.read_guest((1 << 32) + 0x1000_0000, 4) == b"deep"
        assert m.memory.read(m.dom0.p2m.lookup((1 << 32) + 0x1000_0000)[0], 4) == b"deep"
