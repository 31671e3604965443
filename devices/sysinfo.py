"""sysinfo: what a payload needs to know about its domain (DESIGN.md section 3).

Like Xen's XENFEAT_direct_mapped / XENFEAT_not_direct_mapped, exactly one of the two flag bits
is set, so a driver can decide whether it may hand its physical addresses to an IOMMU that
works in machine addresses.
"""
from __future__ import annotations

import construct as cs

from devices.regs import RegisterMap
from vmm.registry import DeviceType, Key

MAGIC = 0x4F464E49   # "INFO"
FLAG_DIRECT = 1 << 0
FLAG_NOT_DIRECT = 1 << 1

LAYOUT = RegisterMap(cs.Struct(
    "MAGIC" / cs.Int32ul,
    "_pad0" / cs.Padding(4),
    "RAM_SIZE" / cs.Int64ul,
    "P2M_ROOT" / cs.Int64ul,
    "VTCR" / cs.Int32ul,
    "IPA_BITS" / cs.Int32ul,
    "FLAGS" / cs.Int32ul,
))


class SysInfo:
    def __init__(self, ram_size: int, p2m_root: int, vtcr: int, ipa_bits: int, direct: bool) -> None:
        self.values = {
            "MAGIC": MAGIC, "RAM_SIZE": ram_size, "P2M_ROOT": p2m_root, "VTCR": vtcr,
            "IPA_BITS": ipa_bits, "FLAGS": FLAG_DIRECT if direct else FLAG_NOT_DIRECT,
        }

    def read(self, offset: int, size: int) -> int:
        return LAYOUT.read(self.values, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        pass   # read-only


def build(ctx, spec: dict) -> tuple[SysInfo, int]:
    dom = ctx.domain(spec["domain"])
    dev = SysInfo(ram_size=dom.ram_size, p2m_root=dom.p2m.root, vtcr=dom.p2m.vtcr, ipa_bits=40,
                  direct=dom.direct)
    return dev, spec["size"]


DEVICE = DeviceType(
    "sysinfo", build, doc="read-only facts about a domain: RAM size, P2M root and VTCR, direct-mapped or not",
    keys=(Key("domain", str, "dom0", "the domain it describes", ref="domain"),
          Key("size", int, 0x1000, "window size")))
