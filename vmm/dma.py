"""The path every device-side memory access takes: a translator, then machine memory.

A device never sees machine memory directly. It gets a ``DeviceMemory`` from the machine, which
asks a ``Translator`` (an IPMMU micro-TLB, a virtio-iommu endpoint, the board's policy for a
master behind no IOMMU, or a domain's P2M for structures kept at guest addresses) for the
machine-address runs of a transfer, checks them against machine memory, and only then moves
bytes. A failed translation raises ``DmaFault`` carrying the master-visible status and the first
byte of the failing page the access touches; the IOMMU has already recorded its fault.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from vmm.memory import PAGE, MachineMemory
from vmm.walker import PERMISSION, Fault, R, W

if TYPE_CHECKING:
    from vmm.explain import FaultExplanation
    from vmm.frames import Isolation
    from vmm.machine import Domain
    from vmm.p2m import P2M

STATUS_OK = 0
STATUS_TRANSLATION = 2
STATUS_PERMISSION = 3
STATUS_BAD_LENGTH = 4
STATUS_REFUSED = 5
STATUS_DMA_MASK = 6
STATUS_PRIVATE = 7
STATUS_ISOLATION = 8

PAGE_MASK = ~(PAGE - 1)
ADDR_LIMIT = 1 << 64

Runs = list[tuple[int, int]]          # (machine address, length) in transfer order


class DmaFault(Exception):
    """A refused access: the master-visible STATUS, the first byte of the failing page touched, and
    (when the refusing IOMMU can say more) a ``vmm.explain.FaultExplanation``."""

    def __init__(self, status: int, address: int, why: str = "", explanation: FaultExplanation | None = None) -> None:
        super().__init__(f"DMA fault status {status} at {address:#x}{': ' + why if why else ''}")
        self.status = status
        self.address = address
        self.why = why
        self.explanation = explanation


class Translator(Protocol):
    """What an IOMMU gives each of its masters."""

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        """Machine runs covering [iova, iova + length), or raise DmaFault (recording the fault).
        ``pasid`` is the access's PASID when the master sends one (PCIe PASID prefix, SMMU SSID);
        translators without PASID support ignore it."""
        ...


class Bypass:
    """A master behind no IOMMU under ``unprotected = "bypass"``: bus address = machine address."""

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        return [(iova, length)]


class Refuse:
    """A translator that refuses every access: a master behind no IOMMU under ``unprotected =
    "fault"`` (STATUS 5), or one wired to something that cannot translate for it, such as a uTLB
    its IOMMU does not have (STATUS 2). Nothing is recorded in any IOMMU."""

    def __init__(self, why: str, status: int = STATUS_REFUSED) -> None:
        self.why = why
        self.status = status

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        raise DmaFault(self.status, iova, self.why)


class P2MTranslator:
    """GPA -> MPA through a domain's P2M: the translator of device-side structures (virtqueues,
    request buffers), which a VMM reads the way the domain's CPU sees them."""

    def __init__(self, p2m: P2M) -> None:
        self.p2m = p2m

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        res = self.p2m.walker.translate_range(self.p2m.ctx_id, iova, length, W if write else R)
        if isinstance(res, Fault):
            from vmm.explain import FaultExplanation, explain_walk

            status = STATUS_PERMISSION if res.kind == PERMISSION else STATUS_TRANSLATION
            at = max(res.address & PAGE_MASK, iova)
            steps, reason = explain_walk(self.p2m.memory, None, self.p2m.stage, at, write)
            why = f"the P2M refuses guest-physical address {at:#x}: {reason}"
            expl = FaultExplanation("P2M", at, "write" if write else "read",
                                    status, why, context="stage 2 (the domain's P2M)", steps=steps)
            raise DmaFault(status, at, "not in the P2M", expl)
        return res


Observer = Callable[[int, bytes], None]
TransferListener = Callable[[str, int, int, bool, Runs], None]    # device, iova, length, write, runs


class DeviceMemory:
    """One device's window on memory: translate, then access (rust-vmm's ``IommuMemory`` shape).

    The translator is a master's IOMMU (an IPMMU uTLB, a virtio-iommu endpoint), the board's
    policy for a master behind none, or a domain's P2M for structures the device reads by guest
    address; it is resolved on first use, so IOMMUs may be built after their masters. Every run
    is checked against machine memory before a byte moves. Given the P2M it translates through,
    the object caches the machine frame of each page it touched (a virtqueue request costs half a
    dozen small ring accesses) and drops the cache on every P2M change; IOMMU translations are not
    cached here (the walker's IOTLB does that, and the guest's invalidations govern it).
    ``observers`` see every byte read from memory, with its machine address.
    """

    def __init__(self, memory: MachineMemory, resolve: Callable[[], Translator], name: str,
                 p2m: P2M | None = None, isolation: Isolation | None = None,
                 report: Callable[[str, DmaFault, bool | None], None] | None = None,
                 transfers: list[TransferListener] | None = None) -> None:
        self.memory = memory
        self.isolation = isolation
        self.report = report            # the machine's fault log (explanations)
        self.transfers = transfers if transfers is not None else []     # the machine's (timelines)
        self.view = memory.view
        self.name = name
        self._resolve = resolve
        self._translator: Translator | None = None
        self.observers: list[Observer] = []
        self._rd: dict[int, int] = {}
        self._wr: dict[int, int] = {}
        self._cache = p2m is not None
        self.on_private: Callable[[str], None] | None = None     # told when an access meets a private frame
        self.blocked: str | None = None
        if p2m is not None:
            p2m.listeners.append(self.flush)
            if isolation is not None:
                isolation.owners.listeners.append(self.flush)     # sharing changed: judge frames again

    @property
    def translator(self) -> Translator:
        if self._translator is None:
            self._translator = self._resolve()
        return self._translator

    def flush(self, gpa: int = 0, size: int = 0) -> None:
        self._rd.clear()
        self._wr.clear()

    # -- translate --------------------------------------------------------------------------
    def map(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        """Translate a transfer and check that it stays inside machine memory; raises DmaFault
        with the first byte of the failing page the transfer touches."""
        try:
            if iova < 0 or iova + length > ADDR_LIMIT:
                raise DmaFault(STATUS_TRANSLATION, max(iova, 0) & (ADDR_LIMIT - 1), "beyond the address space")
            runs = self.translator.translate(iova, length, write, pasid) if pasid is not None else \
                self.translator.translate(iova, length, write)
            size = self.memory.size
            cursor = iova
            for mpa, n in runs:
                if mpa < 0 or mpa + n > size:
                    bad = cursor + max(0, min(n, size - mpa)) if mpa < size else cursor
                    raise DmaFault(STATUS_TRANSLATION, max(bad & PAGE_MASK, iova),
                                   f"lands at machine address {mpa + (max(bad & PAGE_MASK, iova) - cursor):#x}, "
                                   f"outside machine memory ({size:#x} bytes)")
                cursor += n
        except DmaFault as fault:
            if self.report is not None:
                self.report(self.name, fault, write)
            raise
        if self.transfers:
            for listener in self.transfers:
                listener(self.name, iova, length, write, runs)
        return runs

    def check(self, iova: int, runs: Runs) -> None:
        """The frame checks (``vmm.frames``) of one transfer: see ``check_all``."""
        if self.isolation is not None:
            self.check_all([(iova, runs)])

    def check_all(self, transfers: list[tuple[int, Runs]]) -> None:
        """Judge the machine frames of a translated access, given as (device address, runs) in the
        order the device touches them: a private frame of a secure domain is refused with STATUS 7
        (the first one over all transfers); runs that leave the device's domain are reported and,
        under ``isolation = "fault"``, refused with STATUS 8. Separate from ``map`` because a master
        translates all its pages before any frame is judged."""
        iso = self.isolation
        if iso is None:
            return
        verdict = iso.judge(self.name, transfers)
        if verdict is None:
            return
        status, at = verdict
        if status == STATUS_PRIVATE:
            fault = DmaFault(status, at, f"touches private memory: {iso.last}")
        else:
            fault = DmaFault(status, at, f"crosses into a frame its domain does not own (isolation = \"fault\"): "
                                         f"{iso.last}")
        if self.report is not None:
            self.report(self.name, fault, None)
        if status == STATUS_PRIVATE and self.on_private is not None:
            self.on_private(fault.why)
        raise fault

    def block(self, why: str) -> None:
        """Refuse every further access until ``unblock`` (a virtio device that needs a reset)."""
        self.blocked = why
        self.flush()

    def unblock(self) -> None:
        self.blocked = None

    def map_checked(self, iova: int, length: int, write: bool) -> Runs:
        if self.blocked is not None:
            raise DmaFault(STATUS_PRIVATE, iova, f"the device waits for a reset: {self.blocked}")
        runs = self.map(iova, length, write)
        if self.isolation is not None:
            self.check_all([(iova, runs)])
        return runs

    def page(self, page: int, write: bool) -> int:
        """Machine address of the page at ``page`` (page aligned); raises DmaFault."""
        cache = self._wr if write else self._rd
        mpa = cache.get(page)
        if mpa is None:
            runs = self.map_checked(page, PAGE, write)
            if len(runs) != 1 or runs[0][1] != PAGE:
                raise DmaFault(STATUS_TRANSLATION, page, "page does not map to one frame")
            mpa = runs[0][0]
            if self._cache:
                if len(cache) > 4096:
                    cache.clear()
                cache[page] = mpa
        return mpa

    def runs(self, iova: int, length: int, write: bool) -> Runs:
        """Machine runs of [iova, iova + length), page by page through the cache (one translator
        call for the whole transfer when nothing is cached)."""
        if length <= 0:
            return []
        if not self._cache:
            return self.map_checked(iova, length, write)
        if iova < 0 or iova + length > ADDR_LIMIT:
            raise DmaFault(STATUS_TRANSLATION, max(iova, 0) & (ADDR_LIMIT - 1), "beyond the address space")
        out: Runs = []
        cursor, end = iova, iova + length
        while cursor < end:
            off = cursor & (PAGE - 1)
            n = min(PAGE - off, end - cursor)
            mpa = self.page(cursor - off, write) + off
            if out and out[-1][0] + out[-1][1] == mpa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((mpa, n))
            cursor += n
        return out

    # -- access -----------------------------------------------------------------------------
    def gather(self, runs: Runs) -> bytes:
        view = self.view
        if len(runs) == 1:
            mpa, n = runs[0]
            data = bytes(view[mpa:mpa + n])
        else:
            data = b"".join(view[mpa:mpa + n] for mpa, n in runs)
        if self.observers:
            off = 0
            for mpa, n in runs:
                for obs in self.observers:
                    obs(mpa, data[off:off + n])
                off += n
        return data

    def scatter(self, runs: Runs, data: bytes | memoryview) -> None:
        view = self.view
        off = 0
        for mpa, n in runs:
            view[mpa:mpa + n] = data[off:off + n]
            off += n

    def copy(self, src: Runs, dst: Runs) -> None:
        """Move a transfer's bytes from the machine runs ``src`` to the machine runs ``dst`` (equal
        totals), as if read whole and then written: machine to machine, with no intermediate copy,
        unless the two sets of runs may overlap or someone observes the reads."""
        view = self.view
        if len(src) == 1 and len(dst) == 1:
            (s, n), (d, _) = src[0], dst[0]
            if not self.observers and (s + n <= d or d + n <= s):
                view[d:d + n] = view[s:s + n]
                return
        elif not self.observers:
            s_lo, s_hi = min(m for m, _ in src), max(m + n for m, n in src)
            d_lo, d_hi = min(m for m, _ in dst), max(m + n for m, n in dst)
            if s_hi <= d_lo or d_hi <= s_lo:
                si, soff, sv = 0, 0, src[0]
                for d, n in dst:
                    while n:
                        s, sn = sv
                        take = min(n, sn - soff)
                        view[d:d + take] = view[s + soff:s + soff + take]
                        d += take
                        n -= take
                        soff += take
                        if soff == sn and si + 1 < len(src):
                            si, soff = si + 1, 0
                            sv = src[si]
                return
        self.scatter(dst, self.gather(src))

    def read(self, iova: int, length: int) -> bytes:
        return self.gather(self.runs(iova, length, False))

    def write(self, iova: int, data: bytes) -> None:
        self.scatter(self.runs(iova, len(data), True), data)

    def unpack(self, st: struct.Struct, iova: int) -> tuple:
        """One fixed layout at ``iova`` (a descriptor, a ring index): one cache probe when it
        sits inside a page."""
        off = iova & (PAGE - 1)
        if off + st.size <= PAGE:
            mpa = self._rd.get(iova - off)
            if mpa is None:
                mpa = self.page(iova - off, False)
            mpa += off
            if self.observers:
                data = bytes(self.view[mpa:mpa + st.size])
                for obs in self.observers:
                    obs(mpa, data)
            return st.unpack_from(self.view, mpa)
        return st.unpack(self.read(iova, st.size))

    def pack(self, st: struct.Struct, iova: int, *values: int) -> None:
        off = iova & (PAGE - 1)
        if off + st.size <= PAGE:
            mpa = self._wr.get(iova - off)
            if mpa is None:
                mpa = self.page(iova - off, True)
            st.pack_into(self.view, mpa + off, *values)
        else:
            self.write(iova, st.pack(*values))

    def gather_segments(self, segments: list[tuple[int, int]], length: int) -> bytes:
        """The first ``length`` bytes of a scatter list (device-readable buffers)."""
        if len(segments) == 1 and not self.observers:
            gpa, n = segments[0]
            n = min(n, length)
            off = gpa & (PAGE - 1)
            mpa = self._rd.get(gpa - off)
            if mpa is not None and off + n <= PAGE:
                mpa += off
                return bytes(self.view[mpa:mpa + n])
        parts = []
        for gpa, n in segments:
            if length <= 0:
                break
            take = min(n, length)
            parts.append(self.read(gpa, take))
            length -= take
        return b"".join(parts)

    def map_segments(self, segments: list[tuple[int, int]], length: int) -> Runs:
        """Machine runs for writing the first ``length`` bytes of a scatter list (checked first,
        so a request whose reply cannot be delivered is refused before it has any effect)."""
        if len(segments) == 1:
            gpa, n = segments[0]
            n = min(n, length)
            off = gpa & (PAGE - 1)
            mpa = self._wr.get(gpa - off)
            if mpa is not None and off + n <= PAGE:
                return [(mpa + off, n)]
        out: Runs = []
        for gpa, n in segments:
            if length <= 0:
                break
            take = min(n, length)
            out.extend(self.runs(gpa, take, True))
            length -= take
        return out


class TranslatingDevice(Protocol):
    """A bus device that is an IOMMU: it hands each master wired to it a translator."""

    def translator(self, master: int, domain: Domain) -> Translator: ...
