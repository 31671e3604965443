"""IPMMU-VMSA (R-Car Gen3) register layout, declared once with ``construct``.

The declarations below are the single source of truth for offsets, bit fields, reset values and
which instance (root IPMMU-MM, cache, or both) a register matters in (facts/ipmmu.md sections 1
and 10). At import time they are compiled into two plain tables the access path uses:

- ``DECODE``: 32-bit register offset -> ``(block, index, name)`` (block = ``CTX`` with a context
  number, ``UTLB`` with a uTLB number, or ``GLOBAL``), so an access is one dict lookup;
- ``FIELDS``: register -> field -> ``(shift, width)``, from which the bit masks are derived.

Every register resets to 0 (facts section 10); ``RESET`` keeps the declared value anyway so a
change here is a change everywhere.
"""
from __future__ import annotations

import construct as cs

from devices.regs import RegisterMap

ROOT, CACHE, BOTH = "root", "cache", "both"
CTX, UTLB, GLOBAL = "ctx", "utlb", "global"

CTX_STRIDE = 0x40
UTLB_STRIDE = 0x10
UTLB_LOW_BASE = 0x300          # uTLB 0..31
UTLB_HIGH_BASE = 0x600         # uTLB 32.. ("R-Car Gen3 only")
MAX_CONTEXTS = 8               # Gen3: contexts stop at 8 * 0x40 = 0x200
MAX_UTLBS = 64                 # 0x600 + 16 * 31 = 0x7F0 is the last slot the split leaves room for
WINDOW = 0x1000


def reg(where: str, doc: str, reset: int = 0) -> cs.Construct:
    """One 32-bit register: its reset value and the instance it matters in, kept in its docs."""
    return cs.Default(cs.Int32ul, reset) * f"{where}: {doc}"


def bits(*fields: cs.Construct) -> cs.Construct:
    """A little-endian 32-bit register's bit fields, most significant first (construct's order)."""
    return cs.ByteSwapped(cs.BitStruct(*fields))


def _res(n: int) -> cs.Construct:
    return cs.BitsInteger(n)


# -- blocks ---------------------------------------------------------------------------------------

CONTEXT = cs.Struct(                       # context n at n * 0x40
    "IMCTR" / reg(BOTH, "context control; the cache copy latches and flushes but does not gate"),
    "IMCAAR" / reg(ROOT, "cache area address (never used by the drivers)"),
    "IMTTBCR" / reg(ROOT, "translation table control"),
    "IMBUSCR" / reg(ROOT, "bus control (Gen2 only)"),
    "IMTTLBR0" / reg(ROOT, "TTBR0[31:0] (bits [3:0] ignored)"),
    "IMTTUBR0" / reg(ROOT, "TTBR0[39:32] in [7:0]"),
    "IMTTLBR1" / reg(ROOT, "TTBR1[31:0] (unused by the model's walks)"),
    "IMTTUBR1" / reg(ROOT, "TTBR1[39:32]"),
    "IMSTR" / reg(ROOT, "fault status: write-0-to-clear"),
    "_pad24" / cs.Padding(4),
    "IMMAIR0" / reg(ROOT, "memory attributes 0..3 (latched; attributes do not change a DMA copy)"),
    "IMMAIR1" / reg(ROOT, "memory attributes 4..7"),
    "IMELAR" / reg(ROOT, "fault address [31:0], owned by the hardware"),
    "IMEUAR" / reg(ROOT, "fault address [63:32], owned by the hardware"),
    "_pad38" / cs.Padding(CTX_STRIDE - 0x38),
)

MICRO_TLB = cs.Struct(                     # uTLB u at 0x300 + 16u (u < 32) / 0x600 + 16(u - 32)
    "IMUCTR" / reg(CACHE, "uTLB control: MMUEN, FLUSH (self-clearing), TTSEL, FIXADD"),
    "_pad4" / cs.Padding(4),
    "IMUASID" / reg(CACHE, "uTLB ASIDs (latched)"),
    "_padc" / cs.Padding(4),
)

PMB = cs.Struct(                           # at 0x200: Gen2 PMB registers, latched, never used
    "IMPCTR" / reg(BOTH, "PMB control"),
    "_pad204" / cs.Padding(4),
    "IMPSTR" / reg(BOTH, "PMB status"),
    "IMPEAR" / reg(BOTH, "PMB error address"),
    "_pad210" / cs.Padding(0x280 - 0x210),
    *[f"IMPMBA{n}" / reg(BOTH, "PMB address") for n in range(16)],
    *[f"IMPMBD{n}" / reg(BOTH, "PMB data") for n in range(16)],
)

CONTROL = cs.Struct(                       # at 0x500
    "IMSCTLR" / reg(BOTH, "security control: USE_SECGRP (Xen clears it on every instance)"),
    "IMSAUXCTLR" / reg(ROOT, "auxiliary control: S2PTE selects stage-2 descriptors in PMB mode"),
    "_pad508" / cs.Padding(0x540 - 0x508),
    "IMSSTR" / reg(ROOT, "per-cache interrupt status (never set by the model)"),
    "_pad544" / cs.Padding(0x560 - 0x544),
    "IMRAM0ERRCTR" / reg(BOTH, "RAM ECC"),
    "IMRAM0ERRSTR" / reg(BOTH, "RAM ECC"),
    "IMRAM1ERRCTR" / reg(BOTH, "RAM ECC"),
    "IMRAM1ERRSTR" / reg(BOTH, "RAM ECC"),
    "IMRAM2ERRSTR" / reg(BOTH, "RAM ECC"),
    "IMRAM3ERRSTR" / reg(BOTH, "RAM ECC"),
    "IMRAMECCCMPCTR" / reg(BOTH, "RAM ECC"),
    "IMRAMECCCMPSTR" / reg(BOTH, "RAM ECC"),
)
GLOBAL_BLOCKS = ((PMB, 0x200), (CONTROL, 0x500))

# -- bit fields -----------------------------------------------------------------------------------

BITS: dict[str, cs.Construct] = {
    "IMCTR": bits(
        "_r30" / _res(2), "VA64" / cs.Flag, "_r18" / _res(11), "TRE" / cs.Flag, "AFE" / cs.Flag,
        "_r6" / _res(10), "RTSEL" / cs.BitsInteger(2), "TREN" / cs.Flag, "INTEN" / cs.Flag,
        "FLUSH" / cs.Flag, "MMUEN" / cs.Flag),
    "IMTTBCR": bits(
        "EAE" / cs.Flag, "PMB" / cs.Flag, "SH1" / cs.BitsInteger(2), "ORGN1" / cs.BitsInteger(2),
        "IRGN1" / cs.BitsInteger(2), "PGSZ" / cs.Flag, "SCSZ" / cs.Flag, "TSZ1" / cs.BitsInteger(6),
        "_r14" / _res(2), "SH0" / cs.BitsInteger(2), "ORGN0" / cs.BitsInteger(2), "IRGN0" / cs.BitsInteger(2),
        "SL0" / cs.BitsInteger(2), "TSZ0" / cs.BitsInteger(6)),
    "IMSTR": bits(
        "_r14" / _res(18), "ERRLVL" / cs.BitsInteger(2), "_r11" / _res(1), "ERRCODE" / cs.BitsInteger(3),
        "_r5" / _res(3), "MHIT" / cs.Flag, "_r3" / _res(1), "ABORT" / cs.Flag, "PF" / cs.Flag, "TF" / cs.Flag),
    "IMUCTR": bits(
        "FIXADDEN" / cs.Flag, "_r24" / _res(7), "FIXADD" / cs.BitsInteger(8), "_r8" / _res(8),
        "TTSEL" / cs.BitsInteger(4), "_r2" / _res(2), "FLUSH" / cs.Flag, "MMUEN" / cs.Flag),
    "IMUASID": bits("_r16" / _res(16), "ASID8" / cs.BitsInteger(8), "ASID0" / cs.BitsInteger(8)),
    "IMSCTLR": bits("_r29" / _res(3), "USE_SECGRP" / cs.Flag, "_r0" / _res(28)),
    "IMSAUXCTLR": bits("_r4" / _res(28), "S2PTE" / cs.Flag, "_r0" / _res(3)),
}

# -- compilation ----------------------------------------------------------------------------------


def _fields(layout: cs.Construct) -> dict[str, tuple[int, int]]:
    """Field -> (shift, width) of a ``bits`` declaration (walks the BitStruct from the MSB down)."""
    inner = layout.subcon.subcon          # ByteSwapped -> Bitwise -> Struct
    out, pos = {}, 32
    for sub in inner.subcons:
        width = sub.sizeof()
        pos -= width
        if not sub.name.startswith("_"):
            out[sub.name] = (pos, width)
    assert pos == 0, "a register's fields must add up to 32 bits"
    return out


def _regs(layout: cs.Construct) -> list[tuple[int, str, str, int]]:
    """(offset, name, holder, reset) of every 32-bit register of a block."""
    rmap = RegisterMap(layout)
    out = []
    for sub in layout.subcons:
        if sub.name in rmap.fields:
            holder = sub.docs.split(":", 1)[0]
            out.append((rmap.offset(sub.name), sub.name, holder, sub.subcon.value))
    return out


FIELDS: dict[str, dict[str, tuple[int, int]]] = {name: _fields(layout) for name, layout in BITS.items()}
HOLDER: dict[str, str] = {}
RESET: dict[str, int] = {}
CTX_REGS: list[str] = []
UTLB_REGS: list[str] = []
GLOBAL_REGS: list[str] = []


def utlb_offset(u: int) -> int:
    """IMUCTR(u): the 0x300 bank below 32, the Gen3 0x600 bank from 32."""
    return UTLB_LOW_BASE + UTLB_STRIDE * u if u < 32 else UTLB_HIGH_BASE + UTLB_STRIDE * (u - 32)


def _compile() -> dict[int, tuple[str, int, str]]:
    decode: dict[int, tuple[str, int, str]] = {}
    for off, name, holder, reset in _regs(CONTEXT):
        HOLDER[name], RESET[name] = holder, reset
        CTX_REGS.append(name)
        for c in range(MAX_CONTEXTS):
            decode[c * CTX_STRIDE + off] = (CTX, c, name)
    for off, name, holder, reset in _regs(MICRO_TLB):
        HOLDER[name], RESET[name] = holder, reset
        UTLB_REGS.append(name)
        for u in range(MAX_UTLBS):
            decode[utlb_offset(u) + off] = (UTLB, u, name)
    for layout, base in GLOBAL_BLOCKS:
        for off, name, holder, reset in _regs(layout):
            HOLDER[name], RESET[name] = holder, reset
            GLOBAL_REGS.append(name)
            decode[base + off] = (GLOBAL, 0, name)
    assert all(0 <= off < WINDOW and off % 4 == 0 for off in decode)
    return decode


DECODE = _compile()
OFFSETS: dict[str, int] = {name: off for off, (blk, _, name) in DECODE.items() if blk == GLOBAL}
OFFSETS.update({name: off for off, name, _, _ in _regs(CONTEXT)})
OFFSETS.update({name: off for off, name, _, _ in _regs(MICRO_TLB)})


def bit(register: str, field: str) -> int:
    """The mask of one field."""
    shift, width = FIELDS[register][field]
    return ((1 << width) - 1) << shift


def ctx_offset(c: int, name: str) -> int:
    return c * CTX_STRIDE + OFFSETS[name]


def utlb_reg_offset(u: int, name: str) -> int:
    return utlb_offset(u) + OFFSETS[name]


# The masks the model uses (names as in the drivers).
IMCTR_MMUEN = bit("IMCTR", "MMUEN")
IMCTR_FLUSH = bit("IMCTR", "FLUSH")
IMCTR_INTEN = bit("IMCTR", "INTEN")
IMCTR_VA64 = bit("IMCTR", "VA64")
IMTTBCR_EAE = bit("IMTTBCR", "EAE")
IMTTBCR_PMB = bit("IMTTBCR", "PMB")
IMTTBCR_SL0_SHIFT, _ = FIELDS["IMTTBCR"]["SL0"]
IMTTBCR_TSZ0 = bit("IMTTBCR", "TSZ0")
IMSTR_TF = bit("IMSTR", "TF")
IMSTR_PF = bit("IMSTR", "PF")
IMSTR_ABORT = bit("IMSTR", "ABORT")
IMSTR_MHIT = bit("IMSTR", "MHIT")
IMSTR_ERR_MASK = IMSTR_TF | IMSTR_PF | IMSTR_ABORT | IMSTR_MHIT        # 0x17
IMSTR_ERRCODE_SHIFT, _ = FIELDS["IMSTR"]["ERRCODE"]
IMSTR_ERRLVL_SHIFT, _ = FIELDS["IMSTR"]["ERRLVL"]
ERRCODE_NONE, ERRCODE_TLB_FORMAT, ERRCODE_ACCESS_PERM, ERRCODE_SECURE_ACCESS = 0, 1, 4, 5
IMUCTR_MMUEN = bit("IMUCTR", "MMUEN")
IMUCTR_FLUSH = bit("IMUCTR", "FLUSH")
IMUCTR_TTSEL_SHIFT, _ = FIELDS["IMUCTR"]["TTSEL"]
IMUCTR_TTSEL = bit("IMUCTR", "TTSEL")
IMSAUXCTLR_S2PTE = bit("IMSAUXCTLR", "S2PTE")
IMSCTLR_USE_SECGRP = bit("IMSCTLR", "USE_SECGRP")
