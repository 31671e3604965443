"""sysinfo: what a payload needs to know about its domain (DESIGN.md section 3).

Like Xen's XENFEAT_direct_mapped / XENFEAT_not_direct_mapped, exactly one of the two flag bits
is set, so a driver can decide whether it may hand its physical addresses to an IOMMU that
works in machine addresses. Bit 2 says the domain is secure (its pages are private until shared
through the ``hyp`` window), as a pseries guest learns it runs as a secure VM.
"""
from __future__ import annotations

from devices.layout import layout
from devices.regs import RO, Bank, Reg, RegisterFile
from vmm.registry import DeviceType, Key

MAGIC = 0x4F464E49   # "INFO"


@layout
def SYSINFO_REGS(cs):
    return cs.Struct(
        "MAGIC" / cs.Int32ul,
        "_pad0" / cs.Padding(4),
        "RAM_SIZE" / cs.Int64ul,
        "P2M_ROOT" / cs.Int64ul,
        "VTCR" / cs.Int32ul,
        "IPA_BITS" / cs.Int32ul,
        "FLAGS" / cs.Int32ul,
    )


LAYOUT = Bank(SYSINFO_REGS, [
    Reg("MAGIC", 0x00, access=RO, reset=MAGIC, doc='"INFO"'),
    Reg("RAM_SIZE", 0x08, width=8, access=RO, doc="bytes of RAM"),
    Reg("P2M_ROOT", 0x10, width=8, access=RO, doc="machine address of the concatenated level-1 tables"),
    Reg("VTCR", 0x18, access=RO, doc="the VTCR value for the P2M"),
    Reg("IPA_BITS", 0x1C, access=RO),
    Reg("FLAGS", 0x20, access=RO, fields={"DIRECT": 0, "NOT_DIRECT": 1, "SECURE": 2},
        doc="exactly one of DIRECT and NOT_DIRECT is set: GPA == MPA for every page, or not; SECURE: "
            "the domain's memory is private unless shared (DESIGN section 7)"),
], "sysinfo")
FLAGS = LAYOUT["FLAGS"]


class SysInfo:
    def __init__(self, ram_size: int, p2m_root: int, vtcr: int, ipa_bits: int, direct: bool,
                 secure: bool = False) -> None:
        flags = (FLAGS.DIRECT.mask if direct else FLAGS.NOT_DIRECT.mask) | (FLAGS.SECURE.mask if secure else 0)
        self.regs = RegisterFile(LAYOUT, RAM_SIZE=ram_size, P2M_ROOT=p2m_root, VTCR=vtcr, IPA_BITS=ipa_bits,
                                 FLAGS=flags)

    def read(self, offset: int, size: int) -> int:
        return self.regs.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        pass   # read-only


def build(ctx, spec: dict) -> tuple[SysInfo, int]:
    dom = ctx.domain(spec["domain"])
    dev = SysInfo(ram_size=dom.ram_size, p2m_root=dom.p2m.root, vtcr=dom.p2m.vtcr, ipa_bits=40,
                  direct=dom.direct, secure=dom.secure)
    return dev, spec["size"]


DEVICE = DeviceType(
    "sysinfo", build, doc="read-only facts about a domain: RAM size, P2M root and VTCR, direct-mapped or not",
    keys=(Key("domain", str, "dom0", "the domain it describes", ref="domain"),
          Key("size", int, 0x1000, "window size")))
