"""hyp: the hypercall window (DESIGN section 7) at 0x0C001000 on rcar-virt.

The lab's stand-in for the calls a guest makes about the memory devices see: pseries secure VMs'
UV_SHARE_PAGE / UV_UNSHARE_PAGE (share, unshare) and Xen's translate_gpfn_list and XENMEM_exchange
(translate; exchange: make pages machine-contiguous below 2^ADDR_BITS, as
xen_create_contiguous_region does for swiotlb-xen). A guest writes GPA, PAGES (and ADDR_BITS),
then CMD; the command is done when the write returns (STATUS, RESULT, SHARED). The semantics live
in ``vmm.hypercall``; this is their register face.
"""
from __future__ import annotations

import logging

from devices.layout import layout
from devices.regs import RO, WO, Bank, Reg, RegisterFile
from vmm import hypercall
from vmm.registry import DeviceType, Key

log = logging.getLogger("vmm.hyp")

CMD_SHARE, CMD_UNSHARE, CMD_TRANSLATE, CMD_EXCHANGE = 1, 2, 3, 4
STATUS_OK, STATUS_BAD_RANGE, STATUS_NOT_SECURE, STATUS_NO_MEMORY = (
    hypercall.OK, hypercall.BAD_RANGE, hypercall.NOT_SECURE, hypercall.NO_MEMORY)
STATUS_BAD_COMMAND = 4           # a CMD value that is no command (the contract lists 1..4)


@layout
def HYP_REGS(cs):
    return cs.Struct(
        "GPA" / cs.Int64ul,
        "PAGES" / cs.Int32ul,
        "CMD" / cs.Int32ul,
        "STATUS" / cs.Int32ul,
        "ADDR_BITS" / cs.Int32ul,
        "RESULT" / cs.Int64ul,
        "SHARED" / cs.Int64ul,
    )


LAYOUT = Bank(HYP_REGS, [
    Reg("GPA", 0x00, width=8, doc="first guest-physical address of the range (4 KiB aligned)"),
    Reg("PAGES", 0x08, doc="pages in the range"),
    Reg("CMD", 0x0C, access=WO, on_write="_command", doc="1 share, 2 unshare, 3 translate, 4 exchange"),
    Reg("STATUS", 0x10, access=RO, doc="0 done, 1 bad range, 2 not a secure guest, 3 no machine memory left"),
    Reg("ADDR_BITS", 0x14, reset=32, doc="exchange: the run must lie below 2^ADDR_BITS"),
    Reg("RESULT", 0x18, width=8, access=RO, doc="translate: machine address of GPA; exchange: of the run"),
    Reg("SHARED", 0x20, width=8, access=RO, on_read="_shared", doc="guest pages shared now"),
], "hyp")


class Hyp:
    def __init__(self, machine, domain) -> None:
        self.machine = machine
        self.domain = domain
        self.regs = RegisterFile(LAYOUT, self)
        self.read = self.regs.read            # the bus face is the register file's: one call per access
        self.write = self.regs.write

    def _shared(self) -> int:
        return hypercall.shared_pages(self.machine, self.domain)

    def _command(self, old: int, cmd: int) -> None:
        regs, dom = self.regs, self.domain
        gpa, pages = regs["GPA"], regs["PAGES"]
        result = 0
        if cmd in (CMD_SHARE, CMD_UNSHARE):
            status = hypercall.share(self.machine, dom, gpa, pages, shared=cmd == CMD_SHARE)
        elif cmd == CMD_TRANSLATE:
            status = hypercall.check_range(dom, gpa, pages)
            if status == STATUS_OK:
                result = hypercall.translate(dom, gpa) or 0
        elif cmd == CMD_EXCHANGE:
            status, result = hypercall.exchange(self.machine, dom, gpa, pages, regs["ADDR_BITS"])
            if status == STATUS_OK:
                log.debug("hyp: exchange [%#x, +%d pages) -> machine %#x", gpa, pages, result)
        else:
            status = STATUS_BAD_COMMAND
        regs["STATUS"] = status
        regs["RESULT"] = result


def build(ctx, spec: dict) -> tuple[Hyp, int]:
    return Hyp(ctx.machine, ctx.domain(spec["domain"])), spec["size"]


DEVICE = DeviceType(
    "hyp", build, doc="the hypercall window: share, unshare, translate and exchange guest pages (DESIGN section 7)",
    keys=(Key("domain", str, "dom0", "the domain whose pages it manages", ref="domain"),
          Key("size", int, 0x1000, "window size")))
