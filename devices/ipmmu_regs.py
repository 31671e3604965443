"""IPMMU-VMSA (R-Car Gen3) registers, declared once with their behaviour.

Offsets and widths are declared once, as ``construct`` layouts of the three kinds of block an
instance's 0x1000 window holds: a context (repeated every 0x40 from 0), a uTLB (repeated at
0x300 + 16u below 32 and 0x600 + 16(u - 32) from 32) and the instance-wide registers at their
absolute offsets. Each register then gets a ``Reg`` declaration -- offset (checked against the
layout at import), access, reset, fields, which instance it matters in (``holder``: root
IPMMU-MM, cache or both; facts/ipmmu.md sections 1 and 10) and the ``Ipmmu`` method a write
triggers. At import time they compile into the tables the access path uses:

- ``DECODE``: 32-bit register offset -> ``(block, index, name)`` (block = ``CTX`` with a context
  number, ``UTLB`` with a uTLB number, or ``GLOBAL``), so an access is one dict lookup;
- ``FIELDS``, ``HOLDER``, ``RESET``, ``OFFSETS``: views of the declarations by register name.

Every register resets to 0 (facts section 10); ``RESET`` keeps the declared value anyway so a
change here is a change everywhere.
"""
from __future__ import annotations

from devices.layout import layout
from devices.regs import RO, W0C, Bank, Reg

ROOT, CACHE, BOTH = "root", "cache", "both"
CTX, UTLB, GLOBAL = "ctx", "utlb", "global"

CTX_STRIDE = 0x40
UTLB_STRIDE = 0x10
UTLB_LOW_BASE = 0x300          # uTLB 0..31
UTLB_HIGH_BASE = 0x600         # uTLB 32.. ("R-Car Gen3 only")
MAX_CONTEXTS = 8               # Gen3: contexts stop at 8 * 0x40 = 0x200
MAX_UTLBS = 64                 # 0x600 + 16 * 31 = 0x7F0 is the last slot the split leaves room for
WINDOW = 0x1000

ERRCODE_NONE, ERRCODE_TLB_FORMAT, ERRCODE_ACCESS_PERM, ERRCODE_SECURE_ACCESS = 0, 1, 4, 5


def reg(name: str, offset: int, holder: str, doc: str, **kw) -> Reg:
    """One 32-bit IPMMU register (all of them are): a read/write latch unless ``kw`` says more."""
    return Reg(name, offset, doc=doc, holder=holder, **kw)


# -- a context (context n at n * 0x40) ------------------------------------------------------------

IMCTR = reg("IMCTR", 0x00, BOTH, "context control; the cache copy latches and flushes but does not gate",
            fields={"VA64": 29, "TRE": 17, "AFE": 16, "RTSEL": (4, 2), "TREN": 3, "INTEN": 2,
                    "FLUSH": 1, "MMUEN": 0},
            self_clearing=["FLUSH"], on_write="_imctr_written")
IMCAAR = reg("IMCAAR", 0x04, ROOT, "cache area address (never used by the drivers)")
IMTTBCR = reg("IMTTBCR", 0x08, ROOT, "translation table control",
              fields={"EAE": 31, "PMB": 30, "SH1": (28, 2), "ORGN1": (26, 2), "IRGN1": (24, 2),
                      "PGSZ": 23, "SCSZ": 22, "TSZ1": (16, 6), "SH0": (12, 2), "ORGN0": (10, 2),
                      "IRGN0": (8, 2), "SL0": (6, 2), "TSZ0": (0, 6),
                      "TSZ0_VA32": (0, 3)},          # the part of TSZ0 a 32-bit (VA64 = 0) context uses
              on_write="_walk_changed")
IMBUSCR = reg("IMBUSCR", 0x0C, ROOT, "bus control (Gen2 only)")
IMTTLBR0 = reg("IMTTLBR0", 0x10, ROOT, "TTBR0[31:0] (bits [3:0] ignored)", fields={"TTBR": (4, 28)},
               on_write="_walk_changed")
IMTTUBR0 = reg("IMTTUBR0", 0x14, ROOT, "TTBR0[39:32] in [7:0]", fields={"TTBR": (0, 8)},
               on_write="_walk_changed")
IMTTLBR1 = reg("IMTTLBR1", 0x18, ROOT, "TTBR1[31:0] (unused by the model's walks)")
IMTTUBR1 = reg("IMTTUBR1", 0x1C, ROOT, "TTBR1[39:32]")
IMSTR = reg("IMSTR", 0x20, ROOT, "fault status: write-0-to-clear; the hardware alone sets bits",
            access=W0C, on_write="_imstr_written",
            fields={"ERRLVL": (12, 2), "ERRCODE": (8, 3), "MHIT": 4, "ABORT": 2, "PF": 1, "TF": 0})
IMMAIR0 = reg("IMMAIR0", 0x28, ROOT, "memory attributes 0..3 (latched; attributes do not change a DMA copy)")
IMMAIR1 = reg("IMMAIR1", 0x2C, ROOT, "memory attributes 4..7")
IMELAR = reg("IMELAR", 0x30, ROOT, "fault address [31:0], owned by the hardware", access=RO)
IMEUAR = reg("IMEUAR", 0x34, ROOT, "fault address [63:32], owned by the hardware", access=RO)


@layout
def CONTEXT_LAYOUT(cs):
    return cs.Struct(
        "IMCTR" / cs.Int32ul,              # 0x00
        "IMCAAR" / cs.Int32ul,             # 0x04
        "IMTTBCR" / cs.Int32ul,            # 0x08
        "IMBUSCR" / cs.Int32ul,            # 0x0c
        "IMTTLBR0" / cs.Int32ul,           # 0x10
        "IMTTUBR0" / cs.Int32ul,           # 0x14
        "IMTTLBR1" / cs.Int32ul,           # 0x18
        "IMTTUBR1" / cs.Int32ul,           # 0x1c
        "IMSTR" / cs.Int32ul,              # 0x20
        "_pad24" / cs.Padding(4),
        "IMMAIR0" / cs.Int32ul,            # 0x28
        "IMMAIR1" / cs.Int32ul,            # 0x2c
        "IMELAR" / cs.Int32ul,             # 0x30
        "IMEUAR" / cs.Int32ul,             # 0x34
        "_pad38" / cs.Padding(CTX_STRIDE - 0x38),
    )


CONTEXT = Bank(CONTEXT_LAYOUT, [IMCTR, IMCAAR, IMTTBCR, IMBUSCR, IMTTLBR0, IMTTUBR0, IMTTLBR1, IMTTUBR1, IMSTR,
                                IMMAIR0, IMMAIR1, IMELAR, IMEUAR], "IPMMU context")

# -- a uTLB (uTLB u at 0x300 + 16u for u < 32, 0x600 + 16(u - 32) from 32) ------------------------

IMUCTR = reg("IMUCTR", 0x0, CACHE, "uTLB control",
             fields={"FIXADDEN": 31, "FIXADD": (16, 8), "TTSEL": (4, 4), "FLUSH": 1, "MMUEN": 0},
             self_clearing=["FLUSH"], on_write="_imuctr_written")
IMUASID = reg("IMUASID", 0x8, CACHE, "uTLB ASIDs (latched)", fields={"ASID8": (8, 8), "ASID0": (0, 8)})


@layout
def MICRO_TLB_LAYOUT(cs):
    return cs.Struct(
        "IMUCTR" / cs.Int32ul,             # +0x0
        "_pad4" / cs.Padding(4),
        "IMUASID" / cs.Int32ul,            # +0x8
        "_padc" / cs.Padding(4),
    )


MICRO_TLB = Bank(MICRO_TLB_LAYOUT, [IMUCTR, IMUASID], "IPMMU uTLB")

# -- instance-wide registers, at their offsets in the window --------------------------------------

IMSCTLR = reg("IMSCTLR", 0x500, BOTH, "security control: USE_SECGRP (Xen clears it on every instance)",
              fields={"USE_SECGRP": 28})
IMSAUXCTLR = reg("IMSAUXCTLR", 0x504, ROOT, "auxiliary control: S2PTE selects stage-2 descriptors in PMB mode",
                 fields={"S2PTE": 3}, on_write="_s2pte_changed")


@layout
def GLOBALS_LAYOUT(cs):
    return cs.Struct(
        "_contexts" / cs.Padding(MAX_CONTEXTS * CTX_STRIDE),
        "IMPCTR" / cs.Int32ul,             # 0x200: Gen2 PMB registers, latched, never used
        "_pad204" / cs.Padding(4),
        "IMPSTR" / cs.Int32ul,             # 0x208
        "IMPEAR" / cs.Int32ul,             # 0x20c
        "_pad210" / cs.Padding(0x280 - 0x210),
        *[f"IMPMBA{n}" / cs.Int32ul for n in range(16)],       # 0x280
        *[f"IMPMBD{n}" / cs.Int32ul for n in range(16)],       # 0x2c0
        "_utlbs" / cs.Padding(0x500 - 0x300),                  # the low uTLB bank
        "IMSCTLR" / cs.Int32ul,            # 0x500
        "IMSAUXCTLR" / cs.Int32ul,         # 0x504
        "_pad508" / cs.Padding(0x540 - 0x508),
        "IMSSTR" / cs.Int32ul,             # 0x540
        "_pad544" / cs.Padding(0x560 - 0x544),
        "IMRAM0ERRCTR" / cs.Int32ul,       # 0x560
        "IMRAM0ERRSTR" / cs.Int32ul,
        "IMRAM1ERRCTR" / cs.Int32ul,
        "IMRAM1ERRSTR" / cs.Int32ul,
        "IMRAM2ERRSTR" / cs.Int32ul,
        "IMRAM3ERRSTR" / cs.Int32ul,
        "IMRAMECCCMPCTR" / cs.Int32ul,
        "IMRAMECCCMPSTR" / cs.Int32ul,     # 0x57c
    )


GLOBALS = Bank(GLOBALS_LAYOUT, [
    reg("IMPCTR", 0x200, BOTH, "PMB control"),
    reg("IMPSTR", 0x208, BOTH, "PMB status"),
    reg("IMPEAR", 0x20C, BOTH, "PMB error address"),
    *[reg(f"IMPMBA{n}", 0x280 + 4 * n, BOTH, "PMB address") for n in range(16)],
    *[reg(f"IMPMBD{n}", 0x2C0 + 4 * n, BOTH, "PMB data") for n in range(16)],
    IMSCTLR,
    IMSAUXCTLR,
    reg("IMSSTR", 0x540, ROOT, "per-cache interrupt status (never set by the model)"),
    *[reg(name, 0x560 + 4 * i, BOTH, "RAM ECC") for i, name in enumerate((
        "IMRAM0ERRCTR", "IMRAM0ERRSTR", "IMRAM1ERRCTR", "IMRAM1ERRSTR", "IMRAM2ERRSTR", "IMRAM3ERRSTR",
        "IMRAMECCCMPCTR", "IMRAMECCCMPSTR"))],
], "IPMMU instance")

IMSTR_ERR_MASK = IMSTR.TF.mask | IMSTR.PF.mask | IMSTR.ABORT.mask | IMSTR.MHIT.mask     # 0x17

# -- compilation ----------------------------------------------------------------------------------


def utlb_offset(u: int) -> int:
    """IMUCTR(u): the 0x300 bank below 32, the Gen3 0x600 bank from 32."""
    return UTLB_LOW_BASE + UTLB_STRIDE * u if u < 32 else UTLB_HIGH_BASE + UTLB_STRIDE * (u - 32)


REGS: dict[str, Reg] = {r.name: r for bank in (CONTEXT, MICRO_TLB, GLOBALS) for r in bank}
CTX_REGS: list[str] = list(CONTEXT.regs)
UTLB_REGS: list[str] = list(MICRO_TLB.regs)
GLOBAL_REGS: list[str] = list(GLOBALS.regs)
FIELDS: dict[str, dict[str, tuple[int, int]]] = {
    r.name: {f.name: (f.shift, f.width) for f in r.fields.values()} for r in REGS.values() if r.fields}
HOLDER: dict[str, str] = {name: r.meta["holder"] for name, r in REGS.items()}
RESET: dict[str, int] = {name: r.reset for name, r in REGS.items()}
OFFSETS: dict[str, int] = {name: r.offset for name, r in REGS.items()}   # in its block (global: in the window)


def _compile() -> dict[int, tuple[str, int, str]]:
    decode: dict[int, tuple[str, int, str]] = {}
    for c in range(MAX_CONTEXTS):
        decode.update({c * CTX_STRIDE + r.offset: (CTX, c, r.name) for r in CONTEXT})
    for u in range(MAX_UTLBS):
        decode.update({utlb_offset(u) + r.offset: (UTLB, u, r.name) for r in MICRO_TLB})
    decode.update({r.offset: (GLOBAL, 0, r.name) for r in GLOBALS})
    assert len(decode) == MAX_CONTEXTS * len(CONTEXT.regs) + MAX_UTLBS * len(MICRO_TLB.regs) + len(GLOBALS.regs), \
        "IPMMU register blocks overlap"
    assert all(0 <= off < WINDOW and off % 4 == 0 for off in decode)
    return decode


DECODE = _compile()


def ctx_offset(c: int, name: str) -> int:
    return c * CTX_STRIDE + CONTEXT.offset(name)


def utlb_reg_offset(u: int, name: str) -> int:
    return utlb_offset(u) + MICRO_TLB.offset(name)
