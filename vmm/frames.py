"""Who owns each machine frame, and the isolation watchdog that checks every DMA against it.

Hardware lets a master behind no IOMMU, or behind an IOMMU context in pass-through or misprogrammed,
write wherever its bus addresses land: another domain's RAM, the P2M's own tables. That is exactly
the bug this lab exists to find, so the machine records the owner of every frame (a domain, the
hypervisor's pool, or nobody) and checks the machine runs of every device access against the
accessing device's domain. The board's ``isolation`` key decides what a crossing does: ``warn``
(the hardware's behaviour, made loud: logged once per master and owner, counted), ``fault`` (refused
with STATUS 8) or ``off``. The check is a byte-string comparison per run, not a loop per page.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from vmm.memory import PAGE

log = logging.getLogger("vmm.isolation")

FREE, HYPERVISOR = 0, 1
STATUS_ISOLATION = 8


class FrameOwners:
    """One byte per machine frame: 0 free, 1 the hypervisor, 2.. a domain."""

    def __init__(self, size: int) -> None:
        self.map = bytearray(size // PAGE)
        self.names = {FREE: "free machine memory", HYPERVISOR: "the hypervisor (P2M tables, pools)"}
        self._all = {}

    def add_owner(self, name: str) -> int:
        owner = len(self.names)
        if owner > 255:
            raise ValueError("at most 254 domains")
        self.names[owner] = name
        return owner

    def assign(self, mpa: int, size: int, owner: int, step: int = 1) -> None:
        """Frames [mpa, mpa + size) (every ``step``-th frame from mpa when step > 1) go to owner."""
        first, count = mpa // PAGE, size // PAGE
        self.map[first:first + count * step:step] = bytes([owner]) * count

    def owner_of(self, mpa: int) -> int:
        return self.map[mpa // PAGE]

    def first_foreign(self, runs: list[tuple[int, int]], owner: int) -> tuple[int, int] | None:
        """(index of the run, machine address of its first byte in a frame ``owner`` does not own),
        or None when every frame of every run is the owner's."""
        own = self._all.get(owner)
        if own is None:
            own = self._all[owner] = bytes([owner])
        m = self.map
        for k, (mpa, n) in enumerate(runs):
            if n <= 0:
                continue
            f0, f1 = mpa // PAGE, (mpa + n - 1) // PAGE + 1
            seg = m[f0:f1]
            rest = seg.lstrip(own)
            if rest:
                return k, max(mpa, (f0 + len(seg) - len(rest)) * PAGE)
        return None


class Isolation:
    """The watchdog for one device's accesses on behalf of one domain."""

    def __init__(self, owners: FrameOwners, owner: int, domain: str, policy: str,
                 report: Callable[[str, str, int, int, str], None]) -> None:
        self.owners = owners
        self.owner = owner
        self.domain = domain
        self.policy = policy
        self._report = report
        self.last = ""                  # what the last crossing reached (for fault explanations)

    def check(self, device: str, iova: int, runs: list[tuple[int, int]]) -> int | None:
        """The first byte (as the device addressed it) that crosses into a frame the domain does not
        own, after reporting it; None when the access stays home."""
        hit = self.owners.first_foreign(runs, self.owner)
        if hit is None:
            return None
        k, mpa = hit
        at = iova + sum(n for _, n in runs[:k]) + (mpa - runs[k][0])
        who = self.owners.names[self.owners.owner_of(mpa)]
        self.last = f"device address {at:#x} is machine address {mpa:#x}, owned by {who}"
        self._report(device, self.domain, at, mpa, who)
        return at
