"""Pure-Python reference walker: the same interface as ``vmm.walker.Walker``.

Written from the rules in docs/facts/pgtable.md (sections 1-4) rather than from the C code, so a
differential test between the two checks two independent readings of the architecture. Speed is
not a goal; clarity is. Faults travel as exceptions here (the C returns fault words).

Its IOTLB is a plain dict keyed by (context, 4 KiB input page) so the IOTLB tests and the bench
can run against it too; it follows the same invalidation contract as the C one.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmm.walker import (
    ACCESS_FLAG,
    ADDRESS_SIZE,
    BAD_CD,
    BAD_SUBSTREAM,
    CD_LINEAR,
    CD_SPLIT,
    F_APTABLE,
    F_CHECK_AF,
    F_NS_CHECK,
    F_S2,
    FETCH_CD,
    FETCH_L1,
    MAX_CONTEXTS,
    NS,
    PERMISSION,
    TRANSLATION,
    WALK_ABORT,
    CdTable,
    Fault,
    Stage,
    as_access,
    as_addrs,
    coalesce_range,
    decode_fault,
    range_pages,
)

_READ, _WRITE = 1, 2
_OA_FIELD = (1 << 48) - 1          # descriptor address fields live in bits [47:x]


class _Stop(Exception):
    """A fault found during a walk (unwinds to ``_translate``)."""

    def __init__(self, kind: int, stage: int, level: int, address: int, s1ptw: bool = False, fetch: int = 0) -> None:
        super().__init__(kind)
        self.fault = Fault(kind, stage, level, address, s1ptw, fetch)


@dataclass
class Step:
    """One descriptor read of a walk: which table, which entry, where it was and what it held
    (``descriptor`` None: the read itself failed)."""

    stage: int
    level: int
    table: int          # the table's base (an IPA for a nested stage 1)
    index: int
    table_ipa: int      # the descriptor's address before stage 2 (== address when not nested)
    address: int        # the machine address it was read from
    descriptor: int | None
    what: str = "walk"  # "walk", or a PASID-table fetch: "l1cd" (L1 CD descriptor), "cd" (dword 0)
    extra: int | None = None   # "cd": the CD's dword 1 (TTB0, HAD0)


@dataclass(frozen=True)
class DecodedCd:
    """What a valid CD says about stage 1 (docs/facts/pgtable.md section 7)."""

    stage: Stage
    asid: int
    epd0: bool


_IPS_BITS = (32, 36, 40, 42, 44, 48, 52, 52)
_TG0 = {0: 12, 1: 16, 2: 14}            # CD.TG0: 00 4 KiB, 01 64 KiB, 10 16 KiB (11 reserved)


def decode_cd(d0: int, d1: int, oa_limit: int = 40) -> DecodedCd | None:
    """The CD's dwords 0 and 1 -> its stage 1, or None when the CD is not valid: V = 0, T0SZ
    outside 16..39, TG0 = 11, ENDI = 1 (big-endian tables) or AA64 = 0 (VMSAv8-32 tables)."""
    def bits(v: int, hi: int, lo: int) -> int:
        return (v >> lo) & ((1 << (hi - lo + 1)) - 1)

    t0sz, tg0 = bits(d0, 5, 0), bits(d0, 7, 6)
    if not bits(d0, 31, 31) or not 16 <= t0sz <= 39 or tg0 not in _TG0 or bits(d0, 15, 15) or not bits(d0, 41, 41):
        return None
    granule = _TG0[tg0]
    ia_bits = 64 - t0sz
    start_level = 4 - (ia_bits - 4) // (granule - 3)          # Arm's table for TnSZ -> start level
    flags = (0 if bits(d0, 35, 35) else F_CHECK_AF) | (0 if bits(d1, 1, 1) else F_APTABLE)
    stage = Stage(ttbr=bits(d1, 51, 4) << 4, ia_bits=ia_bits, start_level=start_level, granule=granule,
                  oa_bits=min(_IPS_BITS[bits(d0, 34, 32)], oa_limit), flags=flags)
    return DecodedCd(stage, bits(d0, 63, 48), bool(bits(d0, 14, 14)))


@dataclass
class _Leaf:
    oa: int          # output address of the translated input address
    perms: int       # accesses this leaf (and APTable on the way) allows
    size: int        # bytes covered by the leaf


class _StageGeometry:
    """What one stage's configuration means for a walk (sizes per level, root table)."""

    def __init__(self, st: Stage, stage_no: int) -> None:
        self.st = st
        self.no = stage_no
        g = st.granule
        self.bits_per_level = g - 3
        self.level_size = {lvl: 1 << (g + (3 - lvl) * (g - 3)) for lvl in range(4)}
        first_size = self.level_size[st.start_level]
        max_root_tables = 16 if stage_no == 2 else 1
        self.root_entries = (1 << st.ia_bits) // first_size
        # ia_bits smaller than the start level resolves, or a root larger than permitted:
        # an inconsistent TnSZ/SL0 pair -- every access is a level-0 translation fault.
        self.consistent = (1 << st.ia_bits) >= first_size and \
            self.root_entries <= max_root_tables * (1 << self.bits_per_level)
        if stage_no == 2:
            # Arm's S2InvalidSL / S2InconsistentSL: a root of at least two entries, T0SZ <= 39,
            # no level-3 start with 4 KiB, no level-0 start with 16/64 KiB (no 52-bit support).
            self.consistent = self.consistent and self.root_entries >= 2 and st.ia_bits >= 25 and \
                not (g == 12 and st.start_level == 3) and not (g != 12 and st.start_level == 0)
        root_bytes = 8 * max(self.root_entries, 1)
        self.root = st.ttbr - st.ttbr % root_bytes

    def block_level_ok(self, level: int) -> bool:
        allowed = {12: (1, 2), 14: (2,), 16: (2,)}[self.st.granule]
        return level in allowed


class ReferenceWalker:
    """Slow, obviously-correct translation; see ``vmm.walker.Walker`` for the contract."""

    def __init__(self, mem, tlb_entries: int = 4096) -> None:
        self._mem = mem
        self._contexts: dict[int, tuple[_StageGeometry | None, _StageGeometry | None, int]] = {}
        self._tlb: dict[tuple[int, int], tuple[int, int, int, int, int, tuple[int, ...]]] = {}
        self._tlb_on = True
        self._hits = self._misses = self._walks = 0
        # PASID tables: the table of each table context, its cached CDs and translations
        self._tables: dict[int, CdTable] = {}
        self._cds: dict[int, dict[int, tuple[DecodedCd, _StageGeometry]]] = {}
        self._ptlb: dict[int, dict[tuple[int, int], tuple[int, int, int, int, int]]] = {}

    # -- contexts --------------------------------------------------------------------------
    def context(self, ctx_id: int, s1: Stage | None, s2: Stage | None, s2_id: int = 0) -> None:
        """Define or redefine a context (dropping its cached entries); both None = undefined."""
        if not 0 <= ctx_id < MAX_CONTEXTS:
            raise ValueError(f"context id {ctx_id} out of range")
        for st in (s1, s2):
            if st is not None:
                st.validate()
        self._drop(lambda key, val: key[0] == ctx_id)
        self._tables.pop(ctx_id, None)
        self._cds.pop(ctx_id, None)
        self._ptlb.pop(ctx_id, None)
        if s1 is None and s2 is None:
            self._contexts.pop(ctx_id, None)
            return
        self._contexts[ctx_id] = (
            _StageGeometry(s1, 1) if s1 is not None else None,
            _StageGeometry(s2, 2) if s2 is not None else None,
            s2_id,
        )

    # -- the walk --------------------------------------------------------------------------
    def _fetch(self, pa: int, stage: int, level: int, fault_addr: int) -> int:
        if pa < 0 or pa + 8 > self._mem.size:
            raise _Stop(WALK_ABORT, stage, level, fault_addr)
        return int.from_bytes(self._mem.view[pa:pa + 8], "little")

    def _walk(self, geo: _StageGeometry, ia: int, access: int, via: _StageGeometry | None,
              table_ipas: list[int] | None = None, trace: list[Step] | None = None) -> _Leaf:
        """One stage, D8.15.4 order. ``via``: stage 2 that translates this stage's table IPAs
        (collected in ``table_ipas`` so the IOTLB knows which IPAs the result depends on).
        ``trace`` collects one ``Step`` per descriptor read (fault explanations)."""
        st, stage = geo.st, geo.no
        if not geo.consistent or ia >= 1 << st.ia_bits:
            raise _Stop(TRANSLATION, stage, 0, ia)
        if st.ttbr >= 1 << st.oa_bits:
            raise _Stop(ADDRESS_SIZE, stage, 0, ia)
        s2_format = bool(st.flags & F_S2)
        check_ns = not s2_format and bool(st.flags & F_NS_CHECK)
        honour_aptable = not s2_format and bool(st.flags & F_APTABLE)
        writes_blocked_above = False

        level = st.start_level
        table = geo.root
        entries = geo.root_entries
        while True:
            size = geo.level_size[level]
            index = (ia // size) % entries
            desc_addr = table + 8 * index
            table_ipa = desc_addr
            if via is not None:
                if table_ipas is not None:
                    table_ipas.append(desc_addr)
                try:
                    desc_addr = self._walk(via, desc_addr, _READ, None, trace=trace).oa
                except _Stop as stop:
                    f = stop.fault
                    raise _Stop(f.kind, f.stage, f.level, f.address, True) from None
            if trace is not None:
                trace.append(Step(stage, level, table, index, table_ipa, desc_addr, None))
            desc = self._fetch(desc_addr, stage, level, ia)
            if trace is not None:
                trace[-1].descriptor = desc
            kind = desc & 3
            if kind in (0, 2):
                raise _Stop(TRANSLATION, stage, level, ia)
            is_table = kind == 3 and level < 3
            if not is_table:
                # kind 1 at level 3 is reserved; kind 1 is a block only where blocks exist
                if level == 3 and kind == 1:
                    raise _Stop(TRANSLATION, stage, level, ia)
                if level < 3 and not geo.block_level_ok(level):
                    raise _Stop(TRANSLATION, stage, level, ia)
                base = (desc & _OA_FIELD) // size * size
                if base >= 1 << st.oa_bits:
                    raise _Stop(ADDRESS_SIZE, stage, level, ia)
                if check_ns and not desc >> 5 & 1:
                    raise _Stop(NS, stage, level, ia)
                if st.flags & F_CHECK_AF and not desc >> 10 & 1:
                    raise _Stop(ACCESS_FLAG, stage, level, ia)
                if s2_format:
                    perms = (_READ if desc >> 6 & 1 else 0) | (_WRITE if desc >> 7 & 1 else 0)
                else:
                    writable = not desc >> 7 & 1 and not writes_blocked_above
                    perms = _READ | (_WRITE if writable else 0)
                if access & ~perms & 3:
                    raise _Stop(PERMISSION, stage, level, ia)
                return _Leaf(base + ia % size, perms, size)
            granule_bytes = 1 << st.granule
            next_table = (desc & _OA_FIELD) // granule_bytes * granule_bytes
            if next_table >= 1 << st.oa_bits:
                raise _Stop(ADDRESS_SIZE, stage, level, ia)
            if check_ns and not desc >> 63:
                raise _Stop(NS, stage, level, ia)
            if honour_aptable and desc >> 62 & 1:
                writes_blocked_above = True
            table = next_table
            entries = 1 << geo.bits_per_level
            level += 1

    def explain(self, s1: Stage | None, s2: Stage | None, addr: int, access: int) -> tuple[list[Step], Fault | None]:
        """Walk ``addr`` through the given stages as they are in memory now (no IOTLB), recording
        every descriptor read: the level-by-level account behind a fault explanation."""
        g1 = _StageGeometry(s1, 1) if s1 is not None else None
        g2 = _StageGeometry(s2, 2) if s2 is not None else None
        trace: list[Step] = []
        try:
            ipa = addr
            if g1 is not None:
                ipa = self._walk(g1, addr, access & 3, g2, None, trace).oa
            if g2 is not None:
                self._walk(g2, ipa, access & 3, None, None, trace)
        except _Stop as stop:
            return trace, stop.fault
        return trace, None

    def _translate(self, ctx_id: int, addr: int, access: int) -> tuple[int, int, int, int, int, tuple[int, ...]]:
        """Full translation: (out, perms, input leaf size, ipa or -1, ipa leaf size, s1 table IPAs)."""
        ctx = self._contexts.get(ctx_id)
        if ctx is None:
            raise _Stop(TRANSLATION, 1, 0, addr)
        s1, s2, _ = ctx
        ipa, perms, in_size = addr, _READ | _WRITE, 0
        table_ipas: list[int] = []
        if s1 is not None:
            leaf = self._walk(s1, addr, access, s2, table_ipas)
            ipa, perms, in_size = leaf.oa, leaf.perms, leaf.size
        if s2 is None:
            return ipa, perms, in_size, -1, 0, ()
        leaf2 = self._walk(s2, ipa, access, None)
        return leaf2.oa, perms & leaf2.perms, in_size or leaf2.size, ipa, leaf2.size, tuple(table_ipas)

    def _one(self, ctx_id: int, addr: int, access: int) -> tuple[int, int]:
        page = addr >> 12
        if self._tlb_on and ctx_id in self._contexts:
            hit = self._tlb.get((ctx_id, page))
            if hit is not None and access & ~hit[1] & 3 == 0:
                self._hits += 1
                return hit[0] + (addr & 0xFFF), 0
            self._misses += 1
        self._walks += 1
        try:
            out, perms, in_size, ipa, ipa_size, table_ipas = self._translate(ctx_id, addr, access)
        except _Stop as stop:
            return stop.fault.address, stop.fault.word
        if self._tlb_on and ctx_id in self._contexts:
            self._tlb[(ctx_id, page)] = (out & ~0xFFF, perms, in_size, ipa & ~0xFFF if ipa >= 0 else -1, ipa_size,
                                         table_ipas)
        return out, 0

    # -- PASID tables ----------------------------------------------------------------------
    CD_CACHE_MAX = 1024          # the contract's bounds: beyond them the whole cache goes
    TLB_MAX = 65536

    def table_context(self, ctx_id: int, table: CdTable) -> None:
        """Make ``ctx_id`` a PASID-table context over the stage 2 of ``table.s2_ctx``."""
        if not 0 <= ctx_id < MAX_CONTEXTS:
            raise ValueError(f"context id {ctx_id} out of range")
        table.validate()
        s2ctx = self._contexts.get(table.s2_ctx)
        if table.s2_ctx == ctx_id or s2ctx is None or s2ctx[0] is not None or s2ctx[1] is None \
                or table.s2_ctx in self._tables:
            raise ValueError(f"context {table.s2_ctx} is not a stage-2-only context (or {ctx_id} is)")
        self._drop(lambda key, val: key[0] == ctx_id)
        self._contexts.pop(ctx_id, None)
        self._tables[ctx_id] = table
        self._cds[ctx_id] = {}
        self._ptlb[ctx_id] = {}

    def _s2_of(self, table: CdTable) -> _StageGeometry:
        return self._contexts[table.s2_ctx][1]

    def _fetch_cd(self, table: CdTable, pasid: int, trace: list[Step] | None = None) -> DecodedCd:
        """Find and decode the CD of ``pasid`` (SMMU 5.2 S1Fmt/S1CDMax, 5.3 L1CD), reading every
        entry through stage 2. Raises _Stop with the configuration fault."""
        g2 = self._s2_of(table)
        if pasid >= 1 << table.cdmax:
            raise _Stop(BAD_SUBSTREAM, 1, 0, pasid)

        def read(ipa: int, fetch: int, nbytes: int, what: str, base: int, index: int) -> tuple[int, int]:
            try:
                mpa = self._walk(g2, ipa, _READ, None, trace=trace).oa
            except _Stop as stop:
                f = stop.fault
                raise _Stop(f.kind, f.stage, f.level, ipa, False, fetch) from None
            if trace is not None:
                trace.append(Step(1, 0, base, index, ipa, mpa, None, what))
            if mpa + nbytes > self._mem.size:
                raise _Stop(WALK_ABORT, 1, 0, ipa, False, fetch)
            value = int.from_bytes(self._mem.view[mpa:mpa + 8], "little")
            if trace is not None:
                trace[-1].descriptor = value
            return value, mpa

        if table.fmt == CD_LINEAR:
            base, index = table.ptr, pasid
        else:
            split = CD_SPLIT[table.fmt]
            l1_index = pasid >> split
            l1_ipa = table.ptr + 8 * l1_index
            l1, _ = read(l1_ipa, FETCH_L1, 8, "l1cd", table.ptr, l1_index)
            if not l1 & 1:
                raise _Stop(BAD_SUBSTREAM, 1, 0, l1_ipa, False, FETCH_L1)
            base = l1 & (((1 << 52) - 1) & ~0xFFF)                 # L2Ptr, bits [51:12]
            if split == 10:
                base &= ~0xFFFF                                    # 64 KiB leaves: L2Ptr[15:12] RES0
            index = pasid & ((1 << split) - 1)
        cd_ipa = base + 64 * index
        d0, mpa = read(cd_ipa, FETCH_CD, 16, "cd", base, index)
        d1 = int.from_bytes(self._mem.view[mpa + 8:mpa + 16], "little")
        if trace is not None:
            trace[-1].extra = d1
        cd = decode_cd(d0, d1)
        if cd is None:
            raise _Stop(BAD_CD, 1, 0, cd_ipa, False, FETCH_CD)
        return cd

    def _cd_walk(self, table: CdTable, cd: DecodedCd, addr: int, access: int,
                 trace: list[Step] | None = None) -> tuple[int, int, int, int, int]:
        """Stage 1 of the CD nested over stage 2, then stage 2: (out, perms, in size, ipa, ipa size)."""
        if cd.epd0:
            raise _Stop(TRANSLATION, 1, 0, addr)
        g2 = self._s2_of(table)
        leaf = self._walk(_StageGeometry(cd.stage, 1), addr, access, g2, None, trace)
        leaf2 = self._walk(g2, leaf.oa, access, None, None, trace)
        return leaf2.oa, leaf.perms & leaf2.perms, leaf.size, leaf.oa, leaf2.size

    def _pasid_one(self, ctx_id: int, pasid: int, addr: int, access: int) -> tuple[int, int]:
        table = self._tables.get(ctx_id)
        if table is None:
            return addr, Fault(TRANSLATION, 1, 0, addr).word
        cds, tlb = self._cds[ctx_id], self._ptlb[ctx_id]
        try:
            if self._tlb_on and pasid in cds:
                cd = cds[pasid][0]
            else:
                cd = self._fetch_cd(table, pasid)
                if self._tlb_on:
                    if len(cds) >= self.CD_CACHE_MAX:
                        cds.clear()
                    cds[pasid] = (cd, _StageGeometry(cd.stage, 1))
            key = (cd.asid, addr >> 12)
            if self._tlb_on:
                hit = tlb.get(key)
                if hit is not None and access & ~hit[1] & 3 == 0:
                    self._hits += 1
                    return hit[0] + (addr & 0xFFF), 0
                self._misses += 1
            self._walks += 1
            out, perms, in_size, ipa, ipa_size = self._cd_walk(table, cd, addr, access)
        except _Stop as stop:
            return stop.fault.address, stop.fault.word
        if self._tlb_on:
            if len(tlb) >= self.TLB_MAX:
                tlb.clear()
            tlb[key] = (out & ~0xFFF, perms, in_size, ipa & ~0xFFF, ipa_size)
        return out, 0

    def translate_pasid(self, ctx_id: int, pasid: int, addrs: Iterable[int],
                        access: int | Sequence[int]) -> tuple[array, array]:
        """A batch through one PASID of a table context; never raises."""
        addrs = as_addrs(addrs)
        accs = [access & 3] * len(addrs) if isinstance(access, int) else list(as_access(access, len(addrs)))
        out, fault = array("Q"), array("I")
        for a, acc in zip(addrs, accs, strict=True):
            o, f = self._pasid_one(ctx_id, pasid, a, acc)
            out.append(o)
            fault.append(f)
        return out, fault

    def translate_range_pasid(self, ctx_id: int, pasid: int, addr: int, length: int,
                              access: int) -> list[tuple[int, int]] | tuple[Fault, int]:
        """Coalesced runs for [addr, addr+length) through one PASID, or (fault, failing IOVA)."""
        if length <= 0:
            return []
        if not 0 <= addr < 1 << 64:
            return Fault(TRANSLATION, 1, 0, (1 << 64) - 1), (1 << 64) - 1
        length = min(length, (1 << 64) - addr)
        out = []
        for page in range_pages(addr, length, 12):
            o, f = self._pasid_one(ctx_id, pasid, page, access & 3)
            if f:
                return decode_fault(f, o), page
            out.append(o)
        return coalesce_range(addr, length, 12, out)

    def table_invalidate_cd(self, ctx_id: int, pasid: int | None = None) -> None:
        cds = self._cds.get(ctx_id)
        if cds is not None:
            if pasid is None:
                cds.clear()
            else:
                cds.pop(pasid, None)

    def table_invalidate_tlb(self, ctx_id: int, asid: int | None = None, start: int = 0,
                             length: int | None = None) -> None:
        tlb = self._ptlb.get(ctx_id)
        if tlb is None or (length is not None and length <= 0):
            return
        end = (1 << 64) if length is None else start + length
        for key in [k for k, v in tlb.items() if (asid is None or k[0] == asid)
                    and (k[1] << 12) // v[2] * v[2] < end and (k[1] << 12) // v[2] * v[2] + v[2] > start]:
            del tlb[key]

    def table_cached_asid(self, ctx_id: int, pasid: int) -> int | None:
        hit = self._cds.get(ctx_id, {}).get(pasid)
        return None if hit is None else hit[0].asid

    def table_counts(self, ctx_id: int) -> tuple[int, int]:
        return len(self._cds.get(ctx_id, {})), len(self._ptlb.get(ctx_id, {}))

    def explain_pasid(self, table: CdTable, s2: Stage, pasid: int, addr: int,
                      access: int) -> tuple[list[Step], Fault | None]:
        """Walk ``addr`` through PASID ``pasid`` of ``table`` as memory is now (no caches):
        the L1 descriptor and CD reads, then both stages, each step recorded."""
        g2 = _StageGeometry(s2, 2)
        trace: list[Step] = []
        saved = self._contexts.get(table.s2_ctx)
        self._contexts[table.s2_ctx] = (None, g2, 0)
        try:
            cd = self._fetch_cd(table, pasid, trace)
            self._cd_walk(table, cd, addr, access & 3, trace)
        except _Stop as stop:
            return trace, stop.fault
        finally:
            if saved is None:
                self._contexts.pop(table.s2_ctx, None)
            else:
                self._contexts[table.s2_ctx] = saved
        return trace, None

    # -- public API (same as Walker) -------------------------------------------------------
    def translate(self, ctx_id: int, addrs: Iterable[int], access: int | Sequence[int]) -> tuple[array, array]:
        """Translate a batch; never raises for bad addresses."""
        addrs = as_addrs(addrs)
        accs = [access & 3] * len(addrs) if isinstance(access, int) else list(as_access(access, len(addrs)))
        out, fault = array("Q"), array("I")
        for a, acc in zip(addrs, accs, strict=True):
            o, f = self._one(ctx_id, a, acc)
            out.append(o)
            fault.append(f)
        return out, fault

    def translate1(self, ctx_id: int, addr: int, access: int) -> int | Fault:
        """One address: the MPA or a Fault."""
        out, fault = self._one(ctx_id, as_addrs([addr])[0], access & 3)
        return out if fault == 0 else decode_fault(fault, out)

    def decode(self, fault_word: int, address: int) -> Fault:
        """Turn a fault word and its reported address into a Fault."""
        return decode_fault(fault_word, address)

    def translate_range(self, ctx_id: int, addr: int, length: int, access: int) -> list[tuple[int, int]] | Fault:
        """Coalesced (mpa, n) runs for [addr, addr+length) or the first fault."""
        if length <= 0:
            return []
        if not 0 <= addr < 1 << 64:
            return Fault(TRANSLATION, 1, 0, (1 << 64) - 1)
        length = min(length, (1 << 64) - addr)           # clipped at 2^64 - 1, like the C walker
        ctx = self._contexts.get(ctx_id)
        gran = min(g.st.granule for g in ctx[:2] if g is not None) if ctx else 12
        out = []
        for page in range_pages(addr, length, gran):     # ascending; the first fault ends the transfer
            o, f = self.translate(ctx_id, [page], access)
            if f[0]:
                return decode_fault(f[0], o[0])
            out.append(o[0])
        return coalesce_range(addr, length, gran, out)

    # -- IOTLB -----------------------------------------------------------------------------
    def _drop(self, pred) -> None:
        for key in [k for k, v in self._tlb.items() if pred(k, v)]:
            del self._tlb[key]

    def invalidate_all(self) -> None:
        self._tlb.clear()
        for ctx_id in self._tables:
            self._cds[ctx_id].clear()
            self._ptlb[ctx_id].clear()

    def invalidate_context(self, ctx_id: int) -> None:
        self._drop(lambda key, val: key[0] == ctx_id)
        if ctx_id in self._tables:
            self._cds[ctx_id].clear()
            self._ptlb[ctx_id].clear()

    def invalidate_range(self, ctx_id: int, start: int, length: int) -> None:
        """Drop entries whose input leaf overlaps the range (the whole leaf, as hardware would)."""
        if length <= 0:
            return
        end = start + length

        def hit(key, val):
            if key[0] != ctx_id:
                return False
            lo = (key[1] << 12) // val[2] * val[2]
            return lo < end and lo + val[2] > start
        self._drop(hit)

    def invalidate_ipa(self, s2_id: int, start: int, length: int) -> None:
        """Drop s2-only and combined entries whose stage-2 leaf overlaps the IPA range."""
        if length <= 0:
            return
        end = start + length
        for ctx_id, table in self._tables.items():
            s2ctx = self._contexts.get(table.s2_ctx)
            if s2ctx is not None and s2ctx[2] == s2_id:      # everything it cached came through that P2M
                self._cds[ctx_id].clear()
                self._ptlb[ctx_id].clear()

        def hit(key, val):
            ctx = self._contexts.get(key[0])
            if ctx is None or ctx[1] is None or ctx[2] != s2_id or val[3] < 0:
                return False
            if any(start <= t < end for t in val[5]):
                return True          # a stage-1 table of this walk was read through that IPA range
            lo = val[3] // val[4] * val[4]
            return lo < end and lo + val[4] > start
        self._drop(hit)

    def stats(self) -> dict:
        """hits/misses of the dict TLB and full walks, like the C counters."""
        return {"hits": self._hits, "misses": self._misses, "walks": self._walks}

    def reset_stats(self) -> None:
        self._hits = self._misses = self._walks = 0

    @property
    def tlb_enabled(self) -> bool:
        return self._tlb_on

    @tlb_enabled.setter
    def tlb_enabled(self, on: bool) -> None:
        if on and not self._tlb_on:
            self._tlb.clear()
        self._tlb_on = bool(on)
