"""Who owns each machine frame and whether devices may touch it: the checks every DMA passes.

Hardware lets a master behind no IOMMU, or behind an IOMMU context in pass-through or misprogrammed,
write wherever its bus addresses land: another domain's RAM, the P2M's own tables. That is exactly
the bug this lab exists to find, so the machine records the owner of every frame (a domain, the
hypervisor's pool, or nobody) and checks the machine runs of every device access against the
accessing device's domain. The board's ``isolation`` key decides what a crossing does: ``warn``
(the hardware's behaviour, made loud: logged once per master and owner, counted), ``fault`` (refused
with STATUS 8) or ``off``.

The same byte says whether a device may touch the frame at all (DESIGN section 7): bit 7 set means
the frame holds a page of a secure domain that the guest has not shared (pseries' ultravisor keeps
such pages from every device). One byte-string ``lstrip`` per machine run answers both questions in
the common case -- every frame is the domain's own and shared -- so a copy costs one C-speed scan
per run, never a Python loop per page; only a transfer that meets something else takes the slow
path, which finds the first private frame (STATUS 7) or the first crossing.
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from itertools import chain

from vmm.memory import PAGE

log = logging.getLogger("vmm.isolation")

FREE, HYPERVISOR = 0, 1
PRIVATE = 0x80                   # bit 7 of a frame's byte: a secure domain's page, not shared
OWNER_MASK = 0x7F
STATUS_PRIVATE = 7
STATUS_ISOLATION = 8

_OWNER_OF = bytes(b & OWNER_MASK for b in range(256))             # translate() table: drop bit 7
_PRIVATE_OF = bytes(1 if b & PRIVATE else 0 for b in range(256))  # translate() table: bit 7 -> 1

Runs = list[tuple[int, int]]
C_FROM_RUNS = 4                  # transfers of more runs than this are judged by the C loop


def _c_check():
    """The compiled frame check (``vmm/backends/frames_build.py``), or None where it cannot be
    built: then every run is judged in Python, which is slower, never different."""
    try:
        from vmm.backends import load_compiled
        return load_compiled("_frames")
    except ImportError as e:
        log.debug("frame check in Python: %s", e)
        return None


class FrameOwners:
    """One byte per machine frame: bits 6..0 the owner (0 free, 1 the hypervisor, 2.. a domain),
    bit 7 private (a secure domain's page its guest has not shared)."""

    def __init__(self, size: int) -> None:
        self.map = bytearray(size // PAGE)
        self.names = {FREE: "free machine memory", HYPERVISOR: "the hypervisor (P2M tables, pools)"}
        self.secure = False                 # some frame may be private: the slow path looks for bit 7
        self.listeners: list[Callable[[], None]] = []    # told when privacy changes (device caches)
        self._c = _c_check()
        self._c_map = self._c.ffi.from_buffer("uint8_t[]", self.map) if self._c is not None else None

    def add_owner(self, name: str) -> int:
        owner = len(self.names)
        if owner > OWNER_MASK:
            raise ValueError(f"at most {OWNER_MASK - 1} domains")
        self.names[owner] = name
        return owner

    def assign(self, mpa: int, size: int, owner: int, step: int = 1, private: bool = False) -> None:
        """Frames [mpa, mpa + size) (every ``step``-th frame from mpa when step > 1) go to owner."""
        first, count = mpa // PAGE, size // PAGE
        self.map[first:first + count * step:step] = bytes([owner | (PRIVATE if private else 0)]) * count
        if private:
            self.secure = True

    def owner_of(self, mpa: int) -> int:
        return self.map[mpa // PAGE] & OWNER_MASK

    def is_private(self, mpa: int) -> bool:
        return bool(self.map[mpa // PAGE] & PRIVATE)

    def set_private(self, frames: list[int], private: bool) -> None:
        """Make the machine frames ``frames`` (frame numbers) private or shared, then tell the
        listeners (devices that cache translations must judge the frames again)."""
        m = self.map
        if private:
            self.secure = True
            for f in frames:
                m[f] |= PRIVATE
        else:
            for f in frames:
                m[f] &= OWNER_MASK
        for listener in self.listeners:
            listener()

    def count(self, byte: int) -> int:
        """How many frames hold exactly ``byte`` (e.g. a domain's shared frames: its owner id)."""
        return self.map.count(bytes([byte]))

    def first_foreign(self, runs: Runs, owner: int) -> tuple[int, int] | None:
        """(index of the run, machine address of its first byte in a frame ``owner`` does not own),
        or None when every frame of every run is the owner's (shared or private)."""
        own = bytes([owner])
        m = self.map
        for k, (mpa, n) in enumerate(runs):
            if n <= 0:
                continue
            f0, f1 = mpa // PAGE, (mpa + n - 1) // PAGE + 1
            seg = m[f0:f1]
            if self.secure:
                seg = seg.translate(_OWNER_OF)
            rest = seg.lstrip(own)
            if rest:
                return k, max(mpa, (f0 + len(seg) - len(rest)) * PAGE)
        return None

    def first_private(self, runs: Runs) -> tuple[int, int] | None:
        """(index of the run, machine address of its first byte in a private frame), or None."""
        if not self.secure:
            return None
        m = self.map
        for k, (mpa, n) in enumerate(runs):
            if n <= 0:
                continue
            f0, f1 = mpa // PAGE, (mpa + n - 1) // PAGE + 1
            i = m[f0:f1].translate(_PRIVATE_OF).find(1)
            if i >= 0:
                return k, max(mpa, (f0 + i) * PAGE)
        return None


def _device_address(iova: int, runs: Runs, k: int, mpa: int) -> int:
    """The device address of machine address ``mpa`` inside run ``k`` of a transfer from ``iova``."""
    return iova + sum(n for _, n in runs[:k]) + (mpa - runs[k][0])


class Isolation:
    """The frame checks for one device's accesses on behalf of one domain: the private check (every
    board with a secure domain) and the isolation watchdog (``policy`` warn or fault; off: none)."""

    def __init__(self, owners: FrameOwners, owner: int, domain: str, policy: str,
                 report: Callable[[str, str, int, int, str], None]) -> None:
        self.owners = owners
        self.owner = owner
        self.domain = domain
        self.policy = policy
        self._report = report
        self._own = bytes([owner])
        self.last = ""                  # what the last refusal or crossing reached (for explanations)

    def judge(self, device: str, transfers: list[tuple[int, Runs]]) -> tuple[int, int] | None:
        """(STATUS, device address) of the first refused byte of a transfer made of ``transfers``
        ((device address, machine runs) each, in the order the device touches them), or None.
        Private frames come first (STATUS 7, in transfer order); then crossings into frames the
        domain does not own are reported, and refused (STATUS 8) under ``isolation = "fault"``."""
        owners = self.owners
        m, own = owners.map, self._own
        if owners._c is not None and sum(len(runs) for _, runs in transfers) > C_FROM_RUNS:
            flat = array("Q", chain.from_iterable(chain.from_iterable(runs for _, runs in transfers)))
            c = owners._c
            if c.lib.fc_first_other(owners._c_map, len(m), c.ffi.from_buffer("uint64_t[]", flat),
                                    len(flat) // 2, self.owner) < 0:
                return None
            return self._slow(device, transfers)
        for _, runs in transfers:                       # few runs: one lstrip per run
            for mpa, n in runs:
                if n > 0 and m[mpa // PAGE:(mpa + n - 1) // PAGE + 1].lstrip(own):
                    return self._slow(device, transfers)
        return None

    def _slow(self, device: str, transfers: list[tuple[int, Runs]]) -> tuple[int, int] | None:
        owners = self.owners
        for iova, runs in transfers:
            hit = owners.first_private(runs)
            if hit is not None:
                k, mpa = hit
                at = _device_address(iova, runs, k, mpa)
                who = owners.names[owners.owner_of(mpa)]
                self.last = (f"device address {at:#x} is machine address {mpa:#x}, a private page of {who} "
                             f"(its guest has not shared it)")
                return STATUS_PRIVATE, at
        if self.policy == "off":
            return None
        for iova, runs in transfers:
            hit = owners.first_foreign(runs, self.owner)
            if hit is None:
                continue
            k, mpa = hit
            at = _device_address(iova, runs, k, mpa)
            who = owners.names[owners.owner_of(mpa)]
            self.last = f"device address {at:#x} is machine address {mpa:#x}, owned by {who}"
            self._report(device, self.domain, at, mpa, who)
            if self.policy == "fault":
                return STATUS_ISOLATION, at
        return None
