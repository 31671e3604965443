"""VMSAv8-64 DMA translation: the C walker + IOTLB (``Walker``) and its pure-Python twin.

Every DMA of the machine goes through ``Walker.translate``: one cffi call per batch of
addresses, because a single FFI crossing costs far more than a cached translation (facts
section 8). ``ReferenceWalker`` (vmm.walker.reference) has the same interface and is written
independently from the spec rules so the differential tests compare two readings of the spec.

Fault words returned by ``translate`` pack ``kind | stage << 4 | level << 8 | s1ptw << 12 |
fetch << 13``; ``decode`` turns one into a ``Fault``.

PASID tables (``table_context``): a context may instead hold an SMMUv3 context-descriptor table
(DESIGN section 6). ``translate_pasid`` and ``translate_range_pasid`` then look the PASID's CD up
(linear, or two-level with 4 KiB / 64 KiB leaves), decode it, and walk its stage 1 nested over
the stage 2 of another context (the domain's P2M): every guest-physical access -- L1 descriptor,
CD, stage-1 tables, output -- goes through that stage 2. Decoded CDs are cached per PASID and
translations per (ASID, page) until ``table_invalidate_cd`` / ``table_invalidate_tlb`` (or a
change of that stage 2) drops them, as on SMMUv3.
"""
from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

R, W = 1, 2

F_S2 = 1
F_CHECK_AF = 2
F_NS_CHECK = 4
F_APTABLE = 8

OK, TRANSLATION, ACCESS_FLAG, PERMISSION, ADDRESS_SIZE, WALK_ABORT, NS = 0, 1, 2, 3, 4, 5, 6
BAD_SUBSTREAM, BAD_CD = 7, 8          # PASID tables: configuration faults (SMMU C_BAD_SUBSTREAMID / C_BAD_CD)
KIND_NAMES = {OK: "ok", TRANSLATION: "translation", ACCESS_FLAG: "access-flag", PERMISSION: "permission",
              ADDRESS_SIZE: "address-size", WALK_ABORT: "walk-abort", NS: "ns",
              BAD_SUBSTREAM: "bad-substreamid", BAD_CD: "bad-cd"}
FETCH_NONE, FETCH_L1, FETCH_CD = 0, 1, 2       # which configuration fetch a PASID-table fault hit
FETCH_NAMES = {FETCH_L1: "the L1 CD descriptor", FETCH_CD: "the context descriptor"}

# CD table formats (ATTACH_TABLE s1fmt) and the PASID split of the two-level ones
CD_LINEAR, CD_4K_LEAVES, CD_64K_LEAVES = 0, 1, 2
CD_SPLIT = {CD_4K_LEAVES: 6, CD_64K_LEAVES: 10}
CD_SIZE = 64
MAX_CDMAX = 20

MAX_CONTEXTS = 1024
_U64 = (1 << 64) - 1

__all__ = [
    "R", "W", "F_S2", "F_CHECK_AF", "F_NS_CHECK", "F_APTABLE",
    "OK", "TRANSLATION", "ACCESS_FLAG", "PERMISSION", "ADDRESS_SIZE", "WALK_ABORT", "NS",
    "BAD_SUBSTREAM", "BAD_CD", "FETCH_L1", "FETCH_CD", "CD_LINEAR", "CD_4K_LEAVES", "CD_64K_LEAVES",
    "Stage", "Fault", "CdTable", "Walker", "ReferenceWalker", "MAX_CONTEXTS", "decode_fault", "coalesce_range",
]


@dataclass(frozen=True)
class Stage:
    """One translation stage: where its tables are and how to read them.

    ``ttbr`` is the root table address (an MPA, or an IPA for the stage 1 of a nested context).
    A root address that is not aligned to the root table size is aligned down (the low bits are
    RES0 in TTBR/VTTBR). A configuration whose ``ia_bits`` does not fit ``start_level`` (fewer
    bits than the level resolves, or more root entries than one granule table -- 16 concatenated
    tables for stage 2) is accepted and makes every access a level-0 translation fault, as the
    architecture prescribes for an inconsistent SL0/T0SZ. A stage 2 must also have a root of at
    least two entries and at least 25 input bits, and may not start at level 3 with 4 KiB or at
    level 0 with 16/64 KiB (Arm's S2InvalidSL / S2InconsistentSL).
    """

    ttbr: int
    ia_bits: int
    start_level: int
    granule: int = 12
    oa_bits: int = 40
    flags: int = 0

    def validate(self) -> None:
        """Reject values no register could hold (the walk itself never raises)."""
        if self.granule not in (12, 14, 16):
            raise ValueError(f"granule must be 12, 14 or 16, not {self.granule}")
        if not 0 <= self.start_level <= 3:
            raise ValueError(f"start_level must be 0..3, not {self.start_level}")
        if not 1 <= self.ia_bits <= 48 or not 1 <= self.oa_bits <= 48:
            raise ValueError(f"ia_bits/oa_bits must be 1..48, not {self.ia_bits}/{self.oa_bits}")
        if not 0 <= self.ttbr <= _U64:
            raise ValueError(f"ttbr {self.ttbr:#x} is not a 64-bit value")
        if not 0 <= self.flags <= 15:
            raise ValueError(f"unknown stage flags {self.flags:#x}")


@dataclass(frozen=True)
class Fault:
    """A translation fault: kind, stage (1/2), lookup level and the faulting input address.

    ``address`` is the IOVA for a stage-1 fault and the IPA for a stage-2 fault; with
    ``s1ptw`` it is the IPA of the stage-1 descriptor whose stage-2 translation failed. With
    ``fetch`` (PASID tables) the fault hit a configuration fetch: ``address`` is then the IPA of
    the L1 CD descriptor or the CD (the PASID itself for a PASID out of range).
    """

    kind: int
    stage: int
    level: int
    address: int
    s1ptw: bool = False
    fetch: int = FETCH_NONE

    @property
    def word(self) -> int:
        """The packed fault word as ``translate`` reports it."""
        return self.kind | self.stage << 4 | self.level << 8 | int(self.s1ptw) << 12 | self.fetch << 13

    @property
    def configuration(self) -> bool:
        """A fault of the PASID-table configuration (PASID, L1 descriptor, CD), not of a walk."""
        return self.fetch != FETCH_NONE or self.kind in (BAD_SUBSTREAM, BAD_CD)

    def __str__(self) -> str:
        extra = " s1ptw" if self.s1ptw else ""
        if self.fetch:
            extra += f" fetching {FETCH_NAMES.get(self.fetch, self.fetch)}"
        return (f"{KIND_NAMES.get(self.kind, self.kind)} fault, stage {self.stage} level {self.level}"
                f" at {self.address:#x}{extra}")


def decode_fault(fault_word: int, address: int) -> Fault:
    """Unpack a fault word from ``translate`` (shared by both walkers)."""
    return Fault(fault_word & 0xF, (fault_word >> 4) & 0xF, (fault_word >> 8) & 0xF, address,
                 bool((fault_word >> 12) & 1), (fault_word >> 13) & 3)


@dataclass(frozen=True)
class CdTable:
    """An SMMUv3 context-descriptor table as ATTACH_TABLE gives it: ``ptr`` (S1ContextPtr, an
    IPA), ``fmt`` (S1Fmt: 0 linear, 1 two-level with 4 KiB leaves, 2 with 64 KiB leaves),
    ``cdmax`` (log2 of the number of CDs) and ``s2_ctx``, the context whose stage 2 translates
    every access the table needs."""

    ptr: int
    fmt: int
    cdmax: int
    s2_ctx: int

    def validate(self) -> None:
        if self.fmt not in (CD_LINEAR, CD_4K_LEAVES, CD_64K_LEAVES):
            raise ValueError(f"CD table format must be 0, 1 or 2, not {self.fmt}")
        if not 0 <= self.cdmax <= MAX_CDMAX:
            raise ValueError(f"s1cdmax must be 0..{MAX_CDMAX}, not {self.cdmax}")
        if not 0 <= self.ptr <= _U64:
            raise ValueError(f"s1contextptr {self.ptr:#x} is not a 64-bit value")
        if not 0 <= self.s2_ctx < MAX_CONTEXTS:
            raise ValueError(f"stage-2 context {self.s2_ctx} out of range")

    def l1_entries(self) -> int:
        """Entries of the L1 table (two-level formats)."""
        return 1 << max(0, self.cdmax - CD_SPLIT[self.fmt])

    def size(self) -> int:
        """Bytes of the table S1ContextPtr points at (the L1 table when two-level)."""
        return CD_SIZE << self.cdmax if self.fmt == CD_LINEAR else 8 * self.l1_entries()

    def alignment(self) -> int:
        """What S1ContextPtr must be aligned to: the table's size, at least 64 bytes."""
        return max(64, self.size())


def range_pages(addr: int, length: int, granule: int) -> array:
    """The addresses to translate for [addr, addr+length): addr itself, then each page start."""
    if length <= 0:
        return array("Q")
    if addr < 0 or addr + length > 1 << 64:
        raise ValueError(f"range [{addr:#x}, +{length:#x}) is not within the 64-bit space")
    size = 1 << granule
    first = addr & ~(size - 1)
    last = (addr + length - 1) & ~(size - 1)
    pages = array("Q", range(first, last + 1, size))
    pages[0] = addr
    return pages


def coalesce_range(addr: int, length: int, granule: int, out: Sequence[int]) -> list[tuple[int, int]]:
    """Merge per-page outputs (first one for ``addr`` itself) into contiguous (mpa, nbytes) runs."""
    size = 1 << granule
    end = addr + length
    runs: list[tuple[int, int]] = []
    base = addr & ~(size - 1)
    for i, mpa in enumerate(out):
        start = addr if i == 0 else base + i * size
        n = min(end, base + (i + 1) * size) - start
        if runs and runs[-1][0] + runs[-1][1] == mpa:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((mpa, n))
    return runs


def as_addrs(addrs: Iterable[int]) -> array:
    """addrs as array('Q'); values outside 0..2^64-1 become 2^64-1, which faults (never raises)."""
    if isinstance(addrs, array) and addrs.typecode == "Q":
        return addrs
    if not isinstance(addrs, (list, tuple, array, range)):
        addrs = list(addrs)
    try:
        return array("Q", addrs)
    except OverflowError:
        return array("Q", (a if 0 <= a <= _U64 else _U64 for a in addrs))


def as_access(access: Sequence[int], n: int) -> array:
    """Per-address access bits as array('B') (only R|W matter)."""
    if isinstance(access, array) and access.typecode == "B":
        acc = access
    else:
        acc = array("B", (x & 3 for x in access))
    if len(acc) != n:
        raise ValueError(f"access has {len(acc)} entries for {n} addresses")
    return acc


# -- the compiled module ----------------------------------------------------------------------

def _load_lib():
    """Import the cffi module, building it in place once in a source checkout that lacks it."""
    try:
        from vmm.walker import _walker  # type: ignore[attr-defined]
        return _walker
    except ImportError:
        pass
    import fcntl
    import importlib
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(tempfile.gettempdir(), "iommu-lab-walker-build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            from vmm.walker import _walker  # type: ignore[attr-defined]
            return _walker
        except ImportError:
            pass
        from vmm.walker.build import _ROOT, ffibuilder

        ffibuilder.compile(tmpdir=_ROOT, verbose=False)
        obj = os.path.join(here, "_walker.o")
        if os.path.exists(obj):
            os.remove(obj)
        importlib.invalidate_caches()
        from vmm.walker import _walker  # type: ignore[attr-defined]
        return _walker


_mod = _load_lib()
ffi, lib = _mod.ffi, _mod.lib


class Walker:
    """The C walker and IOTLB over one MachineMemory.

    Keeps a reference to ``mem``: the C side reads the mapping through its host address, so
    the memory must outlive the walker (do not ``close`` it while a walker is alive).
    """

    def __init__(self, mem, tlb_entries: int = 4096) -> None:
        if tlb_entries < 1:
            raise ValueError("tlb_entries must be >= 1")
        self._mem = mem
        w = lib.wk_new(mem.address, mem.size, tlb_entries)
        if w == ffi.NULL:
            raise MemoryError("cannot allocate the walker")
        self._w = ffi.gc(w, lib.wk_free)
        self._granule: dict[int, int] = {}
        self._max_runs = 64
        self._runs = ffi.new("uint64_t[]", 2 * self._max_runs)
        self._rfault = ffi.new("uint32_t[1]")
        self._rfaddr = ffi.new("uint64_t[1]")
        self._rfiova = ffi.new("uint64_t[1]")
        self._stage_buf = (ffi.new("struct wk_stage *"), ffi.new("struct wk_stage *"))
        self._stats = ffi.new("uint64_t[3]")

    # -- contexts --------------------------------------------------------------------------
    def context(self, ctx_id: int, s1: Stage | None, s2: Stage | None, s2_id: int = 0) -> None:
        """Define (or redefine, dropping its IOTLB entries) a context; both None = undefined."""
        if not 0 <= ctx_id < MAX_CONTEXTS:
            raise ValueError(f"context id {ctx_id} out of range 0..{MAX_CONTEXTS - 1}")
        if not 0 <= s2_id < 1 << 32:
            raise ValueError(f"s2_id {s2_id} is not a 32-bit value")
        ptrs = []
        for st, buf in zip((s1, s2), self._stage_buf, strict=True):
            if st is None:
                ptrs.append(ffi.NULL)
                continue
            st.validate()
            buf.ttbr, buf.ia_bits, buf.start_level = st.ttbr, st.ia_bits, st.start_level
            buf.granule, buf.oa_bits, buf.flags = st.granule, st.oa_bits, st.flags
            ptrs.append(buf)
        lib.wk_set_context(self._w, ctx_id, ptrs[0], ptrs[1], s2_id)
        gran = [st.granule for st in (s1, s2) if st is not None]
        if gran:
            self._granule[ctx_id] = min(gran)
        else:
            self._granule.pop(ctx_id, None)

    # -- translation -----------------------------------------------------------------------
    @staticmethod
    def _batch(ctx_id: int, addrs: Iterable[int], access: int | Sequence[int]) -> tuple:
        """The C arguments of a batch: (context id, addresses, access array or NULL, access for all,
        count, out, fault), the output arrays zeroed; count 0 for an empty batch."""
        a = as_addrs(addrs)
        n = len(a)
        out = array("Q", [0]) * n
        fault = array("I", [0]) * n
        if n and not isinstance(access, int):
            accp, acc_all = ffi.from_buffer("uint8_t[]", as_access(access, n)), 0
        else:
            accp, acc_all = ffi.NULL, (access & 3) if isinstance(access, int) else 0
        cid = ctx_id if 0 <= ctx_id < MAX_CONTEXTS else 0xFFFFFFFF
        return cid, a, accp, acc_all, n, out, fault

    def translate(self, ctx_id: int, addrs: Iterable[int], access: int | Sequence[int]) -> tuple[array, array]:
        """Translate a batch in one C call; never raises for bad addresses (they fault)."""
        cid, a, accp, acc_all, n, out, fault = self._batch(ctx_id, addrs, access)
        if n == 0:
            return out, fault
        lib.wk_translate(self._w, cid, ffi.from_buffer("uint64_t[]", a), accp, acc_all, n,
                         ffi.from_buffer("uint64_t[]", out), ffi.from_buffer("uint32_t[]", fault))
        return out, fault

    def translate1(self, ctx_id: int, addr: int, access: int) -> int | Fault:
        """One address (slow path for tests and rare accesses): the MPA or a Fault."""
        out, fault = self.translate(ctx_id, as_addrs([addr]), access)
        return out[0] if fault[0] == 0 else decode_fault(fault[0], out[0])

    def decode(self, fault_word: int, address: int) -> Fault:
        """Turn a fault word and its reported address into a Fault."""
        return decode_fault(fault_word, address)

    def translate_range(self, ctx_id: int, addr: int, length: int, access: int) -> list[tuple[int, int]] | Fault:
        """Every page of [addr, addr+length) in one batch: coalesced (mpa, n) runs or the first fault."""
        if length <= 0:
            return []
        if not 0 <= addr <= _U64:
            return Fault(TRANSLATION, 1, 0, _U64)
        gran = self._granule.get(ctx_id, 12)
        acc = int(access) & 3
        n = lib.wk_translate_range(self._w, ctx_id, addr, min(length, _U64 + 1 - addr), acc, gran,
                                   self._runs, self._max_runs, self._rfault, self._rfaddr)
        if n == -2:     # more runs than the buffer holds: grow it to one run a page and retry
            self._max_runs = (length >> gran) + 2
            self._runs = ffi.new("uint64_t[]", 2 * self._max_runs)
            n = lib.wk_translate_range(self._w, ctx_id, addr, min(length, _U64 + 1 - addr), acc, gran,
                                       self._runs, self._max_runs, self._rfault, self._rfaddr)
        if n < 0:
            return decode_fault(self._rfault[0], self._rfaddr[0])
        runs = self._runs
        return [(runs[2 * i], runs[2 * i + 1]) for i in range(n)]

    # -- IOTLB -----------------------------------------------------------------------------
    def invalidate_all(self) -> None:
        """Drop every cached translation (O(contexts))."""
        lib.wk_invalidate_all(self._w)

    def invalidate_context(self, ctx_id: int) -> None:
        """Drop every entry of one context (O(1): generation bump)."""
        if 0 <= ctx_id < MAX_CONTEXTS:
            lib.wk_invalidate_context(self._w, ctx_id)

    def invalidate_range(self, ctx_id: int, start: int, length: int) -> None:
        """Drop the entries whose input leaf (block or page) overlaps [start, start+length)."""
        if length <= 0 or not 0 <= ctx_id < MAX_CONTEXTS or start < 0 or start > _U64:
            return
        lib.wk_invalidate_range(self._w, ctx_id, start, min(start + length - 1, _U64))

    def invalidate_ipa(self, s2_id: int, start: int, length: int) -> None:
        """Drop every s2-only and combined entry whose stage-2 leaf overlaps that IPA range."""
        if length <= 0 or not 0 <= s2_id < 1 << 32 or start < 0 or start > _U64:
            return
        lib.wk_invalidate_ipa(self._w, s2_id, start, min(start + length - 1, _U64))

    def stats(self) -> dict:
        """Counters since the last reset: IOTLB hits, misses and full walks."""
        lib.wk_stats(self._w, self._stats)
        return {"hits": self._stats[0], "misses": self._stats[1], "walks": self._stats[2]}

    def reset_stats(self) -> None:
        lib.wk_reset_stats(self._w)

    @property
    def tlb_enabled(self) -> bool:
        """False: every translation walks (benches, tests); entries are kept but not used."""
        return bool(lib.wk_get_tlb(self._w))

    @tlb_enabled.setter
    def tlb_enabled(self, on: bool) -> None:
        if on and not self.tlb_enabled:
            # entries were not maintained while off (no inserts, but invalidations may have been
            # skipped by callers that knew it was off): start clean
            lib.wk_invalidate_all(self._w)
        lib.wk_set_tlb(self._w, 1 if on else 0)

    # -- PASID tables ----------------------------------------------------------------------
    def table_context(self, ctx_id: int, table: CdTable) -> None:
        """Make ``ctx_id`` a PASID-table context (dropping whatever it cached); the stage-2
        context must be a defined stage-2-only context."""
        if not 0 <= ctx_id < MAX_CONTEXTS:
            raise ValueError(f"context id {ctx_id} out of range 0..{MAX_CONTEXTS - 1}")
        table.validate()
        cfg = ffi.new("struct wk_cdtable *", {"ptr": table.ptr, "fmt": table.fmt, "cdmax": table.cdmax,
                                              "s2_ctx": table.s2_ctx})
        rc = lib.wk_set_table(self._w, ctx_id, cfg)
        if rc == -2:
            raise MemoryError("cannot allocate the PASID-table caches")
        if rc:
            raise ValueError(f"context {table.s2_ctx} is not a stage-2-only context (or {ctx_id} is)")
        self._granule.pop(ctx_id, None)

    def translate_pasid(self, ctx_id: int, pasid: int, addrs: Iterable[int],
                        access: int | Sequence[int]) -> tuple[array, array]:
        """A batch through one PASID of a table context in one C call (never raises)."""
        cid, a, accp, acc_all, n, out, fault = self._batch(ctx_id, addrs, access)
        if n == 0:
            return out, fault
        lib.wk_table_translate(self._w, cid, pasid & 0xFFFFFFFF, ffi.from_buffer("uint64_t[]", a), accp, acc_all,
                               n, ffi.from_buffer("uint64_t[]", out), ffi.from_buffer("uint32_t[]", fault))
        return out, fault

    def translate_range_pasid(self, ctx_id: int, pasid: int, addr: int, length: int,
                              access: int) -> list[tuple[int, int]] | tuple[Fault, int]:
        """Every 4 KiB page of [addr, addr+length) through one PASID: coalesced (mpa, n) runs, or
        (the first fault, the first byte of the failing page the transfer touches)."""
        if length <= 0:
            return []
        if not 0 <= addr <= _U64:
            return Fault(TRANSLATION, 1, 0, _U64), _U64
        cid = ctx_id if 0 <= ctx_id < MAX_CONTEXTS else 0xFFFFFFFF
        length = min(length, _U64 + 1 - addr)
        fiova = self._rfiova
        args = (self._w, cid, pasid & 0xFFFFFFFF, addr, length, int(access) & 3)
        n = lib.wk_table_translate_range(*args, self._runs, self._max_runs, self._rfault, self._rfaddr, fiova)
        if n == -2:
            self._max_runs = (length >> 12) + 2
            self._runs = ffi.new("uint64_t[]", 2 * self._max_runs)
            n = lib.wk_table_translate_range(*args, self._runs, self._max_runs, self._rfault, self._rfaddr, fiova)
        if n < 0:
            return decode_fault(self._rfault[0], self._rfaddr[0]), fiova[0]
        runs = self._runs
        return [(runs[2 * i], runs[2 * i + 1]) for i in range(n)]

    def table_invalidate_cd(self, ctx_id: int, pasid: int | None = None) -> None:
        """Drop the cached CD of ``pasid`` (every cached CD of the context when None)."""
        if 0 <= ctx_id < MAX_CONTEXTS:
            lib.wk_table_inv_cd(self._w, ctx_id, -1 if pasid is None else pasid & 0xFFFFFFFF)

    def table_invalidate_tlb(self, ctx_id: int, asid: int | None = None, start: int = 0,
                             length: int | None = None) -> None:
        """Drop the cached translations of ``asid`` (every ASID when None) whose input leaf
        overlaps [start, start + length) (the whole input space when ``length`` is None)."""
        if not 0 <= ctx_id < MAX_CONTEXTS or start < 0 or start > _U64 or (length is not None and length <= 0):
            return
        end = _U64 if length is None else min(start + length - 1, _U64)
        lib.wk_table_inv_tlb(self._w, ctx_id, -1 if asid is None else asid & 0xFFFF, start, end)

    def table_cached_asid(self, ctx_id: int, pasid: int) -> int | None:
        """The ASID of the cached CD of ``pasid``, or None when it is not cached."""
        if not 0 <= ctx_id < MAX_CONTEXTS:
            return None
        asid = lib.wk_table_cached_asid(self._w, ctx_id, pasid & 0xFFFFFFFF)
        return None if asid < 0 else asid

    def table_counts(self, ctx_id: int) -> tuple[int, int]:
        """(cached CDs, cached translations) of a table context."""
        buf = ffi.new("uint64_t[2]")
        if 0 <= ctx_id < MAX_CONTEXTS:
            lib.wk_table_counts(self._w, ctx_id, buf)
        return buf[0], buf[1]

    # -- bench support ---------------------------------------------------------------------
    def _bench_chase(self, start: int, loads: int, reps: int) -> int:
        """Floor for the bench: ``reps`` chains of ``loads`` dependent loads in machine memory."""
        return lib.wk_bench_chase(self._w, start, loads, reps)


from vmm.walker.reference import ReferenceWalker  # noqa: E402  (needs Stage/Fault above)
