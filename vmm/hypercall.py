"""What a guest asks its hypervisor about the memory devices see (DESIGN section 7).

The lab's stand-ins for pseries' UV_SHARE_PAGE / UV_UNSHARE_PAGE and Xen's XENMEM_exchange and
translate_gpfn_list, as plain operations on one domain of a machine. The ``hyp`` device
(``devices/hyp.py``) is their register face; tests and the bench call them directly.

- ``share``/``unshare`` flip bit 7 of the frames' bytes in the machine's frame map
  (``vmm.frames``), which every device access is judged against; contents are kept.
- ``translate`` is a P2M lookup.
- ``exchange`` moves guest pages onto machine-contiguous frames below a limit: contents copied,
  the P2M remapped (its listeners flush every IOTLB entry and cache derived from it, and the CPU's
  view follows), the frame map updated (sharing moves with the page), the old frames scrubbed and
  freed. It takes frames that are free or the pages' own, lowest first, never machine frame 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vmm.frames import FREE
from vmm.memory import PAGE

if TYPE_CHECKING:
    from vmm.machine import Domain, Machine

OK, BAD_RANGE, NOT_SECURE, NO_MEMORY = 0, 1, 2, 3
CHUNK = 1 << 16                  # pages looked up at once (bounds the lookup's temporary arrays)
MAX_OVERLAP_PAGES = 4096         # an exchange that must reuse its own frames buffers them: at most 16 MiB


def check_range(dom: Domain, gpa: int, pages: int) -> int:
    """BAD_RANGE unless [gpa, gpa + 4 KiB * pages) is whole pages of the domain's RAM, else OK."""
    if pages <= 0 or gpa < 0 or gpa % PAGE:
        return BAD_RANGE
    end = gpa + pages * PAGE
    if any(start <= gpa and end <= start + size for start, size in dom.ram_ranges):
        return OK
    return BAD_RANGE


def frames_of(dom: Domain, gpa: int, pages: int) -> list[int]:
    """Machine frame numbers of the guest pages [gpa, gpa + 4 KiB * pages) (a checked range)."""
    if dom.direct:
        return list(range(gpa // PAGE, gpa // PAGE + pages))
    out: list[int] = []
    for first in range(0, pages, CHUNK):
        for mpa in dom.p2m.lookup_pages(gpa + first * PAGE, min(CHUNK, pages - first)):
            if mpa is None:              # a RAM page the P2M lost: nothing to share or move
                raise ValueError(f"guest page of {dom.name} is not in its P2M")
            out.append(mpa // PAGE)
    return out


def share(machine: Machine, dom: Domain, gpa: int, pages: int, shared: bool = True) -> int:
    """Let devices touch the pages (``shared``) or no longer; NOT_SECURE in a domain that is not
    secure (before the range is looked at), BAD_RANGE for a bad range."""
    if not dom.secure:
        return NOT_SECURE
    status = check_range(dom, gpa, pages)
    if status == OK:
        machine.frames.set_private(frames_of(dom, gpa, pages), not shared)
    return status


def shared_pages(machine: Machine, dom: Domain) -> int:
    """Distinct guest pages of ``dom`` that are shared now (0 in a domain that is not secure)."""
    return machine.frames.count(dom.owner) if dom.secure else 0


def translate(dom: Domain, gpa: int) -> int | None:
    """The machine address of guest-physical ``gpa`` (None when the P2M does not map it)."""
    if dom.direct:
        return gpa
    mpa = dom.p2m.lookup_pages(gpa & ~(PAGE - 1), 1)[0]
    return None if mpa is None else mpa + (gpa & (PAGE - 1))


def exchange(machine: Machine, dom: Domain, gpa: int, pages: int, addr_bits: int) -> tuple[int, int]:
    """(STATUS, first machine address): make the pages machine-contiguous below 2^addr_bits."""
    status = check_range(dom, gpa, pages)
    if status != OK:
        return status, 0
    limit = 1 << min(max(addr_bits, 0), 64)
    old = frames_of(dom, gpa, pages)
    if (old[-1] + 1) * PAGE <= limit and all(b - a == 1 for a, b in zip(old, old[1:], strict=False)):
        return OK, old[0] * PAGE                     # already there: nothing moves
    if dom.direct:
        return NO_MEMORY, 0                          # a direct-mapped domain never moves a page
    fmap = machine.frames.map
    top = min(limit // PAGE, len(fmap))
    want = bytes(pages)                              # `pages` FREE bytes in a row
    base = fmap.find(want, 1, top)                   # free frames only: no copy overlaps another
    overlap = False
    if base < 0 and pages <= MAX_OVERLAP_PAGES:
        candidate = bytearray(fmap[:top])
        for f in old:
            if f < top:
                candidate[f] = FREE                  # the pages' own frames may be reused
        base = candidate.find(want, 1)
        overlap = True
    if base < 0:
        return NO_MEMORY, 0
    _move(machine, dom, gpa, old, base, overlap)
    return OK, base * PAGE


def _move(machine: Machine, dom: Domain, gpa: int, old: list[int], base: int, overlap: bool) -> None:
    view, fmap, p2m = machine.memory.view, machine.frames.map, dom.p2m
    pages = len(old)
    perms = [p2m.lookup(gpa + i * PAGE)[1] for i in range(pages)]
    bytes_of = [fmap[f] for f in old]
    saved = [bytes(view[f * PAGE:(f + 1) * PAGE]) for f in old] if overlap else None
    new = range(base, base + pages)
    for f in old:                                     # the old frames are free from now on
        fmap[f] = FREE
    p2m.unmap(gpa, pages * PAGE)
    for i, f in enumerate(new):
        if saved is not None:
            view[f * PAGE:(f + 1) * PAGE] = saved[i]
        else:
            view[f * PAGE:(f + 1) * PAGE] = view[old[i] * PAGE:(old[i] + 1) * PAGE]
        fmap[f] = bytes_of[i]
        p2m.map(gpa + i * PAGE, f * PAGE, PAGE, perms[i])
    zero = bytes(PAGE)
    for f in old:                                     # scrub what the domain gave back
        if f not in new:
            view[f * PAGE:(f + 1) * PAGE] = zero
