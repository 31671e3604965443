"""CPU and DMA agree on every guest page, on both backends and both P2M layouts, across a remap."""
from __future__ import annotations

import struct

import pytest
from support import BACKENDS

from vmm import Machine
from vmm.walker import R, W

X = 0x800000
TESTDEV = 0x0D000000


def pattern(tag: int) -> bytes:
    return b"".join(struct.pack("<Q", tag | i) for i in range(512))


class RemapAtSync:
    """The guest pokes this device between its two writes; the harness checks and remaps then."""

    def __init__(self, m: Machine) -> None:
        self.m, self.p2m = m, m.dom0.p2m
        self.y = self.z = None
        self.seen: dict[str, object] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        mem = self.m.memory
        if value == 1:
            self.y = self.p2m.translate(X)
            self.seen["y_holds_first"] = mem.read(self.y, 4096) == pattern(0xA5A5000000000000)
            self.seen["dma_view_first"] = self.m.dom0.p2m_translator.translate(X, 4096, False)
            self.z = mem.alloc()
            self.p2m.unmap(X, 4096)
            self.p2m.map(X, self.z, 4096, R | W)
        elif value == 2:
            self.seen["x_now"] = self.p2m.translate(X)
            self.seen["z_holds_second"] = mem.read(self.z, 4096) == pattern(0x5A5A000000000000)
            self.seen["y_kept_first"] = mem.read(self.y, 4096) == pattern(0xA5A5000000000000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_cpu_and_dma_agree_across_a_remap(backend, p2m):
    m = Machine.from_board("rcar-virt", p2m=p2m)
    dev = RemapAtSync(m)
    m.mmio.add(TESTDEV, 0x1000, dev, "sync")
    r = m.run("p2m_agree", backend=backend)
    assert r.status == 0, r.console.decode()
    if p2m == "direct":
        assert dev.y == X
    else:
        assert dev.y != X and dev.y % 4096 == 0
    assert dev.seen["y_holds_first"], "the walker's stage-2 lookup named the frame the CPU wrote"
    assert dev.seen["dma_view_first"] == [(dev.y, 4096)]
    assert dev.seen["x_now"] == dev.z, "a stale IOTLB entry for X was used after the remap"
    assert dev.seen["z_holds_second"], "the guest's write after the remap landed in the new frame"
    assert dev.seen["y_kept_first"], "the old frame was not written after the remap"
    stats = m.walker.stats()
    assert stats["walks"] >= 2
    m.close()


def test_scattered_layout_has_no_adjacent_or_identity_frames():
    m = Machine.from_board("rcar-virt", p2m="scattered")
    frames = m.dom0.p2m.lookup_pages(0, 64)
    assert all(f is not None and f != i * 4096 for i, f in enumerate(frames))
    assert all(b - a != 4096 for a, b in zip(frames, frames[1:], strict=False))
    m.close()
