"""VMSAv8-64 translation-table editor: the guest P2M (stage 2) and test-built tables (stage 1).

The tables live in machine memory (or anything with ``read``/``read64``/``write``/``write64``,
e.g. an adapter that writes a guest's IPA space) so that the C walker, the CPU view and every
DMA read exactly what this module wrote. Edits follow the Linux io-pgtable rules where the
harness needs the same behaviour as the drivers it hosts: an overlapping map is refused (-EEXIST
there, ``ValueError`` here); unmap/protect of part of a block split it into the next level.
Every edit reports the input range it touched through ``on_change`` so the owner can flush
IOTLBs (``Walker.invalidate_ipa``/``invalidate_range``) and remap the CPU view.
"""
from __future__ import annotations

import struct
from collections.abc import Callable

R, W = 1, 2

_ADDR = ((1 << 48) - 1) & ~0xFFF            # descriptor address field bits [47:12]
_ATTRS = 0xFFC | (0xFFFF << 48)             # lower [11:2] and upper [63:48] attributes
_AF = 1 << 10
_SH_INNER = 3 << 8
_S1_AP2_RO = 1 << 7
_S1_AP1 = 1 << 6
_S1_NS = 1 << 5
_S1_NG = 1 << 11
_S1_ATTRIDX_CACHE = 1 << 2                  # MAIR index 1 = WBRWA, as Linux IOMMU_CACHE
_S1_NSTABLE = 1 << 63
_S2_MEMATTR_WB = 0xF << 2                   # outer+inner write-back
_S2AP_R = 1 << 6
_S2AP_W = 1 << 7

_BLOCK_SHIFTS = {12: (30, 21), 14: (25,), 16: (29,)}
_PS = {32: 0, 36: 1, 40: 2, 42: 3, 44: 4, 48: 5, 52: 6}
_TG0 = {12: 0, 14: 2, 16: 1}


class PageTable:
    """One VMSAv8-64 translation regime (one stage) built in machine memory.

    ``root`` is the MPA of the (possibly concatenated) root table. ``alloc(nbytes, align)``
    returns zeroed table memory (default ``mem.alloc``), ``free(addr, nbytes)`` takes it back.
    """

    def __init__(self, mem, *, stage: int, ia_bits: int, start_level: int, granule: int = 12, oa_bits: int = 40,
                 alloc: Callable[[int, int], int] | None = None, free: Callable[[int, int], None] | None = None,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {stage}")
        if granule not in _BLOCK_SHIFTS:
            raise ValueError(f"granule must be 12, 14 or 16, not {granule}")
        if not 0 <= start_level <= 3:
            raise ValueError(f"start_level must be 0..3, not {start_level}")
        if not 1 <= oa_bits <= 48 or not 1 <= ia_bits <= 48:
            raise ValueError("ia_bits and oa_bits must be 1..48")
        self.mem = mem
        self.stage = stage
        self.ia_bits = ia_bits
        self.oa_bits = oa_bits
        self.granule = granule
        self.start_level = start_level
        self.on_change = on_change
        self._alloc = alloc if alloc is not None else mem.alloc
        self._free = free if free is not None else mem.free
        self._bpl = granule - 3
        self._shift = [granule + (3 - lvl) * self._bpl for lvl in range(4)]
        root_bits = ia_bits - self._shift[start_level]
        max_bits = self._bpl + (4 if stage == 2 else 0)     # up to 16 concatenated stage-2 tables
        if not 0 <= root_bits <= max_bits:
            raise ValueError(f"ia_bits {ia_bits} does not fit start level {start_level} with a "
                             f"{1 << granule}-byte granule at stage {stage}")
        self._root_entries = 1 << root_bits
        gbytes = 1 << granule
        root_bytes = max(8 * self._root_entries, gbytes)
        self._root_bytes = root_bytes
        self.root = self._alloc(root_bytes, root_bytes)
        self._leaf_shift_level = {self._shift[3]: 3}
        for sh in _BLOCK_SHIFTS[granule]:
            lvl = self._shift.index(sh)
            if lvl >= start_level:
                self._leaf_shift_level[sh] = lvl

    # -- geometry ----------------------------------------------------------------------------
    @property
    def page_sizes(self) -> tuple[int, ...]:
        """Leaf sizes ``map`` accepts, ascending (like Linux's pgsize_bitmap)."""
        return tuple(sorted(1 << sh for sh in self._leaf_shift_level))

    @property
    def vtcr(self) -> int:
        """VTCR_EL2 for this stage-2 table (Xen's choice of walk attributes: inner-shareable WBWA).

        T0SZ = 64 - ia_bits, SL0 (4K: 2 - start level; 16K/64K: 3 - start level), TG0, PS from
        oa_bits, IRGN0 = ORGN0 = WBWA, SH0 = inner, RES1 bit 31: 0x80023558 for the board's P2M.
        """
        if self.stage != 2:
            raise ValueError("vtcr is only defined for a stage-2 table")
        sl0 = (2 if self.granule == 12 else 3) - self.start_level
        if not 0 <= sl0 <= 3 or self.oa_bits not in _PS:
            raise ValueError("this geometry has no VTCR encoding without DS/TTST")
        return ((64 - self.ia_bits) | sl0 << 6 | 1 << 8 | 1 << 10 | 3 << 12 | _TG0[self.granule] << 14
                | _PS[self.oa_bits] << 16 | 1 << 31)

    def walker_stage(self, flags: int | None = None):
        """A ``vmm.walker.Stage`` describing this table (AF checked; F_S2 for stage 2)."""
        from vmm.walker import F_CHECK_AF, F_S2, Stage

        if flags is None:
            flags = F_CHECK_AF | (F_S2 if self.stage == 2 else 0)
        return Stage(ttbr=self.root, ia_bits=self.ia_bits, start_level=self.start_level, granule=self.granule,
                     oa_bits=self.oa_bits, flags=flags)

    # -- descriptors --------------------------------------------------------------------------
    def _leaf_desc(self, oa: int, perms: int, level: int) -> int:
        d = oa | (3 if level == 3 else 1) | _AF | _SH_INNER
        if self.stage == 2:
            return d | _S2_MEMATTR_WB | (_S2AP_R if perms & R else 0) | (_S2AP_W if perms & W else 0)
        return d | _S1_AP1 | _S1_NS | _S1_NG | _S1_ATTRIDX_CACHE | (0 if perms & W else _S1_AP2_RO)

    def _table_desc(self, addr: int) -> int:
        return addr | 3 | (_S1_NSTABLE if self.stage == 1 else 0)

    def _perms_of(self, d: int) -> int:
        if self.stage == 2:
            return (R if d & _S2AP_R else 0) | (W if d & _S2AP_W else 0)
        return R | (0 if d & _S1_AP2_RO else W)

    def _with_perms(self, d: int, perms: int) -> int:
        if self.stage == 2:
            return (d & ~(_S2AP_R | _S2AP_W)) | (_S2AP_R if perms & R else 0) | (_S2AP_W if perms & W else 0)
        return (d & ~_S1_AP2_RO) | (0 if perms & W else _S1_AP2_RO)

    def _is_table(self, d: int, level: int) -> bool:
        return level < 3 and d & 3 == 3

    def _entry_addr(self, table: int, level: int, ia: int) -> int:
        idx = ia >> self._shift[level]
        if level != self.start_level:
            idx &= (1 << self._bpl) - 1
        return table + 8 * idx

    def _new_table(self) -> int:
        size = 1 << self.granule
        return self._alloc(size, size)

    def _table_empty(self, table: int) -> bool:
        n = 1 << self._bpl
        return not any(d & 1 for d in struct.unpack(f"<{n}Q", self.mem.read(table, 8 * n)))

    def _has_leaf(self, table: int, level: int) -> bool:
        n = 1 << self._bpl
        for d in struct.unpack(f"<{n}Q", self.mem.read(table, 8 * n)):
            if d & 1 and (not self._is_table(d, level) or self._has_leaf(d & _ADDR, level + 1)):
                return True
        return False

    def _free_tree(self, table: int, level: int) -> None:
        n = 1 << self._bpl
        for d in struct.unpack(f"<{n}Q", self.mem.read(table, 8 * n)):
            if d & 1 and self._is_table(d, level):
                self._free_tree(d & _ADDR, level + 1)
        self._free(table, 1 << self.granule)

    def _split(self, entry: int, d: int, level: int) -> int:
        """Replace the block at ``entry`` by a next-level table with the same translation."""
        child = level + 1
        csize = 1 << self._shift[child]
        oa = d & _ADDR & ~((1 << self._shift[level]) - 1)
        attrs = (d & _ATTRS) | (3 if child == 3 else 1)
        n = 1 << self._bpl
        table = self._new_table()
        self.mem.write(table, struct.pack(f"<{n}Q", *((oa + i * csize) | attrs for i in range(n))))
        self.mem.write64(entry, self._table_desc(table))
        return table

    # -- checks -------------------------------------------------------------------------------
    def _check_range(self, ia: int, size: int) -> None:
        g = 1 << self.granule
        if size <= 0 or ia < 0 or ia % g or size % g:
            raise ValueError(f"range [{ia:#x}, +{size:#x}) is not aligned to the {g:#x} granule")
        if ia + size > 1 << self.ia_bits:
            raise ValueError(f"range [{ia:#x}, +{size:#x}) is beyond the {self.ia_bits}-bit input space")

    @staticmethod
    def _check_perms(perms: int) -> None:
        if perms & ~(R | W) or not perms & (R | W):
            raise ValueError(f"perms must be a non-empty combination of R=1 and W=2, not {perms}")

    def _changed(self, ia: int, size: int) -> None:
        if self.on_change is not None:
            self.on_change(ia, size)

    # -- editing ------------------------------------------------------------------------------
    def map(self, ia: int, oa: int, size: int, perms: int) -> None:
        """Map one leaf of ``size`` bytes; an overlap with an existing leaf raises ValueError."""
        level = self._leaf_shift_level.get(size.bit_length() - 1) if size > 0 and size & (size - 1) == 0 else None
        if level is None:
            raise ValueError(f"size {size:#x} is not a leaf size of this table {[hex(s) for s in self.page_sizes]}")
        if ia < 0 or oa < 0 or ia % size or oa % size:
            raise ValueError(f"map {ia:#x} -> {oa:#x} is not aligned to {size:#x}")
        if ia + size > 1 << self.ia_bits:
            raise ValueError(f"iova {ia:#x} + {size:#x} is beyond the {self.ia_bits}-bit input space")
        if oa + size > 1 << self.oa_bits:
            raise ValueError(f"output {oa:#x} + {size:#x} is beyond the {self.oa_bits}-bit output space")
        self._check_perms(perms)
        table = self.root
        for lvl in range(self.start_level, level):
            entry = self._entry_addr(table, lvl, ia)
            d = self.mem.read64(entry)
            if not d & 1:
                nt = self._new_table()
                self.mem.write64(entry, self._table_desc(nt))
                table = nt
            elif self._is_table(d, lvl):
                table = d & _ADDR
            else:
                raise ValueError(f"map {ia:#x}+{size:#x}: overlaps an existing {1 << self._shift[lvl]:#x} block")
        entry = self._entry_addr(table, level, ia)
        d = self.mem.read64(entry)
        if d & 1:
            if not self._is_table(d, level) or self._has_leaf(d & _ADDR, level + 1):
                raise ValueError(f"map {ia:#x}+{size:#x}: overlaps an existing mapping")
            self.mem.write64(entry, 0)           # an empty table left behind: replace it
            self._free_tree(d & _ADDR, level + 1)
        self.mem.write64(entry, self._leaf_desc(oa, perms, level))
        self._changed(ia, size)

    def unmap(self, ia: int, size: int) -> None:
        """Remove every mapping in [ia, ia+size) (granule aligned); unmapped parts are ignored."""
        self._check_range(ia, size)
        if self._edit(self.root, self.start_level, ia, ia + size, None):
            self._changed(ia, size)

    def protect(self, ia: int, size: int, perms: int) -> None:
        """Set the permissions of every mapping in [ia, ia+size); unmapped parts are ignored."""
        self._check_range(ia, size)
        self._check_perms(perms)
        if self._edit(self.root, self.start_level, ia, ia + size, perms):
            self._changed(ia, size)

    def _edit(self, table: int, level: int, lo: int, hi: int, perms: int | None) -> bool:
        """Unmap (perms None) or re-protect [lo, hi) below ``table``; True if anything changed."""
        esize = 1 << self._shift[level]
        changed = False
        ea = lo & ~(esize - 1)
        while ea < hi:
            entry = self._entry_addr(table, level, ea)
            d = self.mem.read64(entry)
            sub_lo, sub_hi = max(lo, ea), min(hi, ea + esize)
            whole = sub_lo == ea and sub_hi == ea + esize
            if d & 1:
                if self._is_table(d, level):
                    child = d & _ADDR
                    changed |= self._edit(child, level + 1, sub_lo, sub_hi, perms)
                    if perms is None and self._table_empty(child):
                        self.mem.write64(entry, 0)
                        self._free(child, 1 << self.granule)
                elif whole:
                    new = 0 if perms is None else self._with_perms(d, perms)
                    if new != d:
                        self.mem.write64(entry, new)
                        changed = True
                else:
                    if perms is not None and self._with_perms(d, perms) == d:
                        ea += esize
                        continue                 # nothing would change: keep the block
                    child = self._split(entry, d, level)
                    self._edit(child, level + 1, sub_lo, sub_hi, perms)
                    changed = True
            ea += esize
        return changed

    def lookup(self, ia: int) -> tuple[int, int, int] | None:
        """(output address of ``ia``, perms, leaf size) or None when unmapped or out of range."""
        if not 0 <= ia < 1 << self.ia_bits:
            return None
        table = self.root
        for lvl in range(self.start_level, 4):
            d = self.mem.read64(self._entry_addr(table, lvl, ia))
            if not d & 1:
                return None
            if self._is_table(d, lvl):
                table = d & _ADDR
                continue
            size = 1 << self._shift[lvl]
            return (d & _ADDR & ~(size - 1)) | (ia & (size - 1)), self._perms_of(d), size
        return None
