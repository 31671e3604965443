"""Renesas IPMMU-VMSA (R-Car Gen3): one root (IPMMU-MM) and its cache instances.

The behaviour is the contract of facts/ipmmu.md section 10; the register layout is declared in
``devices.ipmmu_regs``. The shape of the model follows the hardware topology:

- the **root** owns the contexts: their translation registers, fault records and the fault IRQ.
  Each IPMMU context is one walker context (ids from ``ctx.alloc_ctx_id()``), so translations are
  cached per context in the C walker's IOTLB and a FLUSH is one O(1) ``invalidate_context``;
- a **cache** owns uTLBs (IMUCTR/IMUASID) and IMCTR copies. A master wired to uTLB u of a cache
  gets a ``UtlbTranslator``; every access reads IMUCTR(u) (pass-through or context number) and asks
  the root to translate with that context. Context ids are global to the root and its caches.

Register writes that change how a context walks (IMCTR, IMTTBCR, TTBR, IMSAUXCTLR) only mark
the context's compiled mode stale; the next access recompiles it and redefines the walker context
if the walk geometry really changed. Nothing a register can hold makes ``read``/``write``/
``translate`` raise: bad configurations become the architected fault or the documented outcome.

Choices where section 10 is silent (each safe for both drivers):
- a walk that reads a table outside machine memory sets IMSTR.ABORT with ERRCODE 0;
- a descriptor whose output or next-table address needs more than 40 bits is a reserved descriptor
  (TF, ERRCODE 1, ERRLVL = level);
- EAE is checked in stage-1 mode only (stage-2 descriptors are always long);
- an input space wider than 48 bits (VA64 with T0SZ < 16), or one its start level cannot cover
  (too few bits, or more root entries than one table / 16 concatenated stage-2 tables), is a
  configuration fault (TF, ERRCODE 0, ERRLVL 0), like "input too large";
- IMSTR is write-0-to-clear and IMELAR/IMEUAR ignore writes in every instance (the cache copies are
  never set by hardware, so they read 0); all other named registers latch in every instance;
- IMUCTR.FLUSH drops the cached translations of the context TTSEL named before and after the write;
- uTLBs >= the instance's ``utlbs`` (48) and contexts >= the root's ``contexts`` read 0, ignore writes.
"""
from __future__ import annotations

import functools
import logging
from array import array
from dataclasses import dataclass

from devices.ipmmu_regs import (
    CTX,
    DECODE,
    ERRCODE_ACCESS_PERM,
    ERRCODE_NONE,
    ERRCODE_SECURE_ACCESS,
    ERRCODE_TLB_FORMAT,
    GLOBAL,
    GLOBAL_REGS,
    IMCTR,
    IMSAUXCTLR,
    IMSTR,
    IMSTR_ERR_MASK,
    IMTTBCR,
    IMTTLBR0,
    IMTTUBR0,
    IMUCTR,
    MAX_CONTEXTS,
    MAX_UTLBS,
    REGS,
    RESET,
    UTLB,
    UTLB_REGS,
    WINDOW,
)
from devices.ipmmu_regs import CTX_REGS as _CTX_REGS
from devices.regs import bind
from vmm.dma import STATUS_PERMISSION, STATUS_TRANSLATION, DmaFault, Refuse, Runs
from vmm.explain import FaultExplanation, explain_walk
from vmm.registry import DeviceType, Key
from vmm.walker import (
    ACCESS_FLAG,
    ADDRESS_SIZE,
    F_NS_CHECK,
    F_S2,
    NS,
    PERMISSION,
    TRANSLATION,
    WALK_ABORT,
    R,
    Stage,
    W,
    coalesce_range,
    decode_fault,
    range_pages,
)

log = logging.getLogger("vmm.ipmmu")

PAGE = 0x1000
PAGE_MASK = ~0xFFF
OA_BITS = 40                  # output addresses and TTBR are 40 bits
MAX_IA_BITS = 48              # the walker's limit; a wider input space is a configuration fault
S2_ID_BASE = 0x49500000       # walker s2 ids of IPMMU contexts: never a domain's (those count from 0)

# Start level from the two-bit SL0: stage-1 (VMSAv7-LPAE/Gen3) encoding and stage-2 (VTCR) encoding.
S1_START_LEVEL = {2: 1, 1: 2, 0: 3}
S2_START_LEVEL = {0: 2, 1: 1, 2: 0}

# Walker fault kind -> (IMSTR bit, ERRCODE, master-visible dma STATUS). ADDRESS_SIZE (a descriptor
# naming an address above 40 bits) is treated as a reserved descriptor; ACCESS_FLAG cannot happen
# (AF is never checked) but is mapped like a format error to be total.
FAULT_MAP: dict[int, tuple[int, int, int]] = {
    TRANSLATION: (IMSTR.TF.mask, ERRCODE_TLB_FORMAT, STATUS_TRANSLATION),
    ADDRESS_SIZE: (IMSTR.TF.mask, ERRCODE_TLB_FORMAT, STATUS_TRANSLATION),
    ACCESS_FLAG: (IMSTR.TF.mask, ERRCODE_TLB_FORMAT, STATUS_TRANSLATION),
    PERMISSION: (IMSTR.PF.mask, ERRCODE_ACCESS_PERM, STATUS_PERMISSION),
    NS: (IMSTR.PF.mask, ERRCODE_SECURE_ACCESS, STATUS_PERMISSION),
    WALK_ABORT: (IMSTR.ABORT.mask, ERRCODE_NONE, STATUS_TRANSLATION),
}


@dataclass(frozen=True)
class Mode:
    """A context compiled for the access path: walkable (limit = 2^input bits) or faulting."""

    ok: bool
    limit: int = 0
    wctx: int = -1
    why: str = ""


def _geometry_ok(ia_bits: int, level: int, stage2: bool) -> bool:
    """Input size vs start level: at least one root entry, at most one table (16 concatenated at
    stage 2); the walker applies the same rule, checked here so the fault gets ERRCODE 0. Stage 2
    accepts only the Arm pairs (facts section 10): SL0 2 (level 0) with T0SZ 16-24, SL0 1 (level 1)
    with 21-33, SL0 0 (level 2) with 30-39, i.e. a root of 2..8192 entries and T0SZ <= 39."""
    shift = 12 + 9 * (3 - level)
    if stage2:
        return 25 <= ia_bits <= MAX_IA_BITS and level < 3 and 1 <= ia_bits - shift <= 13
    return shift <= ia_bits <= MAX_IA_BITS and ia_bits - shift <= 9


class Ipmmu:
    """One IPMMU-VMSA instance (root or cache); the root also translates for every cache."""

    def __init__(self, name: str, role: str, walker, contexts: int, utlbs: int,
                 root_name: str | None = None, irq=None, resolve=None) -> None:
        self.name = name
        self.role = role
        self.walker = walker
        self.nctx = contexts
        self.nutlbs = utlbs
        self.irq = irq
        self._root_name = root_name
        self._resolve = resolve
        self._root: Ipmmu | None = self if role == "root" else None
        # register state: a dict per context, a list per uTLB register, a dict of the rest
        self.ctx: list[dict[str, int]] = [{n: RESET[n] for n in _CTX_REGS} for _ in range(MAX_CONTEXTS)]
        self.utlb: dict[str, list[int]] = {n: [RESET[n]] * MAX_UTLBS for n in UTLB_REGS}
        self.imuctr: list[int] = self.utlb["IMUCTR"]          # what the translators read
        self.glob: dict[str, int] = {n: RESET[n] for n in GLOBAL_REGS}
        self._decode = self._compile_decode()
        self._narrow_logged: set[int] = set()
        # root only: walker context per IPMMU context, compiled modes, last stage given to the walker
        self.wctx: list[int] = []
        self.modes: list[Mode | None] = [None] * MAX_CONTEXTS
        self._stages: list[tuple | None] = [None] * MAX_CONTEXTS
        self.faults = 0                       # recorded faults (tests, bench)
        self.memory = None                    # MachineMemory (set by the builder): explanations read tables
        self.mem_size = 1 << 64               # its size

    # -- topology -----------------------------------------------------------------------------
    @property
    def root(self) -> Ipmmu:
        if self._root is None:
            self._root = self._resolve(self._root_name)
        return self._root

    def translator(self, master_id: int, domain=None) -> UtlbTranslator | Refuse:
        """The port of the master wired to uTLB ``master_id``. The master's domain does not enter
        into it: the context IMUCTR.TTSEL names decides, whoever the master belongs to."""
        if not 0 <= master_id < self.nutlbs:
            log.warning("%s: master wired to uTLB %d, but the instance has %d uTLBs; its DMA aborts",
                        self.name, master_id, self.nutlbs)
            return Refuse(f"{self.name} has no uTLB {master_id}", STATUS_TRANSLATION)
        return UtlbTranslator(self, master_id)

    # -- register access ------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size == 4:
            return self._read32(offset)
        if size == 8:                         # two 32-bit accesses, low word first
            lo = self._read32(offset)
            return lo | self._read32(offset + 4) << 32
        self._narrow(offset, size, "read")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4:
            self._write32(offset, value & 0xFFFFFFFF)
        elif size == 8:
            self._write32(offset, value & 0xFFFFFFFF)
            self._write32(offset + 4, (value >> 32) & 0xFFFFFFFF)
        else:
            self._narrow(offset, size, "write")

    def _narrow(self, offset: int, size: int, what: str) -> None:
        if offset not in self._narrow_logged:
            self._narrow_logged.add(offset)
            log.warning("%s: %d-byte %s at offset %#x ignored (IPMMU registers are 32-bit)",
                        self.name, size, what, offset)

    def _compile_decode(self) -> dict[int, tuple]:
        """offset -> (write rule or None for a plain latch, the register's store, its key there,
        context gate, bound write hook) for every register this instance decodes: the declared
        behaviour bound to this instance, so an access is one dict lookup. A root decodes its
        ``contexts``; a cache decodes all 8 and gates them on the root's count (its root is
        resolved lazily); uTLBs beyond ``utlbs`` are absent (read 0, ignore writes)."""
        root = self.role == "root"
        decode: dict[int, tuple] = {}
        for offset, (block, idx, name) in DECODE.items():
            reg, gate = REGS[name], -1
            if block == CTX:
                if root and idx >= self.nctx:
                    continue
                store, key, gate = self.ctx[idx], name, (-1 if root else idx)
            elif block == UTLB:
                if idx >= self.nutlbs:
                    continue
                store, key = self.utlb[name], idx
            else:
                store, key = self.glob, name
            hook = bind(self, reg.on_write) if block == GLOBAL else bind(self, reg.on_write, idx)
            decode[offset] = (None if reg.latch else reg.written, store, key, gate, hook)
        return decode

    def _read32(self, offset: int) -> int:
        hit = self._decode.get(offset)
        if hit is None:
            return 0
        _, store, key, gate, _ = hit
        if gate >= 0 and gate >= self.root.nctx:
            return 0
        return store[key]

    def _write32(self, offset: int, value: int) -> None:
        hit = self._decode.get(offset)
        if hit is None:
            return
        apply, store, key, gate, hook = hit
        if gate >= 0 and gate >= self.root.nctx:
            return
        old = store[key]
        store[key] = value if apply is None else apply(old, value)
        if hook is not None:
            hook(old, value)

    # -- write hooks (named in devices.ipmmu_regs) -------------------------------------------------
    def _imctr_written(self, c: int, old: int, value: int) -> None:
        if IMCTR.FLUSH(value):                         # FLUSH completes synchronously: reads 0
            self.root.flush_context(c)
        if self.role == "root":
            self.modes[c] = None
            self._update_irq()

    def _imstr_written(self, c: int, old: int, value: int) -> None:
        # Once no fault bit remains the record (ERRCODE, ERRLVL, IMELAR/IMEUAR) is gone, as the
        # drivers' comment describes.
        regs = self.ctx[c]
        if not regs["IMSTR"] & IMSTR_ERR_MASK:
            regs["IMSTR"] = regs["IMELAR"] = regs["IMEUAR"] = 0
        if self.role == "root":
            self._update_irq()

    def _walk_changed(self, c: int, old: int, value: int) -> None:
        """IMTTBCR or TTBR0: the context's compiled mode is stale."""
        if self.role == "root":
            self.modes[c] = None

    def _s2pte_changed(self, old: int, value: int) -> None:
        if self.role == "root":
            self.modes = [None] * MAX_CONTEXTS          # S2PTE changes every stage-2 context's decoding

    def _imuctr_written(self, u: int, old: int, value: int) -> None:
        if IMUCTR.FLUSH(value):
            # the uTLB's cached entries belong to the context it pointed at (and now points at)
            root = self.root
            for v in (old, value):
                root.flush_context(IMUCTR.TTSEL(v))

    # -- contexts (root) ---------------------------------------------------------------------------
    def flush_context(self, c: int) -> None:
        if c < len(self.wctx):
            self.walker.invalidate_context(self.wctx[c])

    def ttbr(self, c: int) -> int:
        regs = self.ctx[c]
        return IMTTUBR0.TTBR(regs["IMTTUBR0"]) << 32 | (regs["IMTTLBR0"] & IMTTLBR0.TTBR.mask)

    def p2m_changed(self, p2m, gpa: int, size: int) -> None:
        """A P2M changed: flush every context whose TTBR is its root (Xen's iommu_iotlb_flush)."""
        for c in range(self.nctx):
            if self.ttbr(c) == p2m.root:
                self.flush_context(c)

    def mode(self, c: int) -> Mode:
        """What context c does with an access, from its registers (section 10, request path)."""
        regs = self.ctx[c]
        ctr, tcr = regs["IMCTR"], regs["IMTTBCR"]
        if not IMCTR.MMUEN(ctr):
            return Mode(False, why="context disabled")
        sl0 = IMTTBCR.SL0(tcr)
        if IMTTBCR.PMB(tcr):
            if not IMCTR.VA64(ctr):
                return Mode(False, why="PMB (stage-2 mode) without IMCTR.VA64")
            stage2, ia_bits, level = True, 64 - IMTTBCR.TSZ0(tcr), S2_START_LEVEL.get(sl0)
            flags = F_S2 if IMSAUXCTLR.S2PTE(self.glob["IMSAUXCTLR"]) else 0
        else:
            if not IMTTBCR.EAE(tcr):
                return Mode(False, why="IMTTBCR.EAE = 0 (short descriptors are not implemented)")
            ia_bits = 64 - IMTTBCR.TSZ0(tcr) if IMCTR.VA64(ctr) else 32 - IMTTBCR.TSZ0_VA32(tcr)
            stage2, level, flags = False, S1_START_LEVEL.get(sl0), F_NS_CHECK
        if level is None:
            return Mode(False, why=f"reserved SL0 {sl0}")
        if not _geometry_ok(ia_bits, level, stage2):
            return Mode(False, why=f"{ia_bits}-bit input cannot start at level {level}")
        wctx = self.wctx[c]
        stage = Stage(ttbr=self.ttbr(c), ia_bits=ia_bits, start_level=level, oa_bits=OA_BITS, flags=flags)
        key = (stage2, stage)
        if self._stages[c] != key:
            if stage2:
                self.walker.context(wctx, None, stage, s2_id=S2_ID_BASE + wctx)
            else:
                self.walker.context(wctx, stage, None, s2_id=S2_ID_BASE + wctx)
            self._stages[c] = key
        return Mode(True, 1 << ia_bits, wctx)

    def record_fault(self, c: int, bit: int, errcode: int, level: int, address: int) -> None:
        """First fault wins the record; later ones only OR their bit in (section 10, Faults)."""
        regs = self.ctx[c]
        if regs["IMSTR"] & IMSTR_ERR_MASK:
            regs["IMSTR"] |= bit
        else:
            regs["IMSTR"] = bit | IMSTR.ERRCODE.encode(errcode) | IMSTR.ERRLVL.encode(level)
            regs["IMELAR"] = address & 0xFFFFFFFF
            regs["IMEUAR"] = (address >> 32) & 0xFFFFFFFF
        self.faults += 1
        self._update_irq()

    def _update_irq(self) -> None:
        if self.irq is not None:
            self.irq.set(any(IMCTR.INTEN(regs["IMCTR"]) and regs["IMSTR"] & IMSTR_ERR_MASK
                             for regs in self.ctx[:self.nctx]))

    # -- the request path (root) ---------------------------------------------------------------
    def translate(self, imuctr: int, iova: int, length: int, write: bool) -> Runs:
        """Translate one master access arriving on a uTLB whose IMUCTR is ``imuctr``."""
        if length <= 0:
            return []
        if not IMUCTR.MMUEN(imuctr):
            return [(iova, length)]                   # pass-through: machine address
        c = IMUCTR.TTSEL(imuctr)
        if c >= self.nctx:
            raise DmaFault(STATUS_TRANSLATION, iova, f"TTSEL {c} names no context")
        mode = self.modes[c]
        if mode is None:
            mode = self.modes[c] = self.mode(c)
        if not mode.ok:
            self._config_fault(c, iova, mode.why, write)
        end = iova + length
        if end > mode.limit:
            if iova >= mode.limit:
                self._config_fault(c, iova, "input address beyond the input size", write)
            self._walk(c, mode.wctx, iova, mode.limit - iova, write)
            self._config_fault(c, mode.limit, "input address beyond the input size", write)
        return self._walk(c, mode.wctx, iova, length, write)

    def _config_fault(self, c: int, address: int, why: str, write: bool) -> None:
        self.record_fault(c, IMSTR.TF.mask, ERRCODE_NONE, 0, address)
        expl = FaultExplanation(self.name, address, "write" if write else "read", STATUS_TRANSLATION,
                                f"configuration fault (IMSTR.TF, ERRCODE 0, ERRLVL 0): {why}",
                                context=f"context {c} ({self.describe_context(c)})")
        raise DmaFault(STATUS_TRANSLATION, address, f"{self.name} context {c}: {why}", expl)

    def describe_context(self, c: int) -> str:
        regs = self.ctx[c]
        return (f"IMCTR {regs['IMCTR']:#x} IMTTBCR {regs['IMTTBCR']:#x} TTBR {self.ttbr(c):#x} "
                f"IMSAUXCTLR {self.glob['IMSAUXCTLR']:#x}")

    def _explain(self, c: int, address: int, write: bool, status: int, bit: int, errcode: int,
                 level: int) -> FaultExplanation:
        """The walk behind a recorded fault, level by level, replayed over the tables as they are."""
        stage2, stage = self._stages[c]
        steps, reason = explain_walk(self.memory, None if stage2 else stage, stage if stage2 else None,
                                     address, write)
        kind = {IMSTR.TF.mask: "TF", IMSTR.PF.mask: "PF", IMSTR.ABORT.mask: "ABORT"}.get(bit, hex(bit))
        return FaultExplanation(self.name, address, "write" if write else "read", status,
                                f"{reason} (IMSTR.{kind}, ERRCODE {errcode}, ERRLVL {level & 3})",
                                context=f"context {c} (stage {2 if stage2 else 1}; {self.describe_context(c)})",
                                steps=steps)

    def _walk(self, c: int, wctx: int, iova: int, length: int, write: bool) -> Runs:
        """Every page in one walker batch. A transfer whose pages land machine-contiguous (the
        common case: io-pgtable maps a buffer page by page onto contiguous memory, P2M blocks)
        is recognised by one C-level array comparison instead of a Python loop per page."""
        pages = range_pages(iova, length, 12)
        out, fault = self.walker.translate(wctx, pages, W if write else R)
        n = len(out)
        clean = fault.count(0) == n
        i = n if clean else next(i for i, f in enumerate(fault) if f)
        if i and max(out if clean else out[:i]) >= self.mem_size:
            # Pages are taken in order: one that translated to an address outside machine memory
            # fails in its turn, before any later page's fault, and the IPMMU records nothing.
            j = next(k for k in range(i) if out[k] >= self.mem_size)
            address = max((iova & PAGE_MASK) + j * PAGE, iova)
            raise DmaFault(STATUS_TRANSLATION, address, f"{self.name} context {c}: outside machine memory")
        if not clean:
            res = decode_fault(fault[i], out[i])
            bit, errcode, status = FAULT_MAP.get(res.kind, FAULT_MAP[TRANSLATION])
            address = max(res.address & PAGE_MASK, iova)      # the first byte of the failing page touched
            self.record_fault(c, bit, errcode, res.level, address)
            raise DmaFault(status, address, f"{self.name} context {c}: {res}",
                           self._explain(c, address, write, status, bit, errcode, res.level))
        first = out[0]
        if n > 1:
            base = first & PAGE_MASK
            contiguous = array("Q", range(base, base + n * PAGE, PAGE))
            contiguous[0] = first
            if out != contiguous:
                return coalesce_range(iova, length, 12, out)
        return [(first, length)] if n else []


class UtlbTranslator:
    """What a master wired to uTLB ``u`` of an instance gets: IMUCTR(u) is read on every access."""

    __slots__ = ("inst", "u", "_root")

    def __init__(self, inst: Ipmmu, u: int) -> None:
        self.inst = inst
        self.u = u
        self._root: Ipmmu | None = None

    def translate(self, iova: int, length: int, write: bool, pasid: int | None = None) -> Runs:
        """The IPMMU has no PASID: a master's PASID is ignored."""
        root = self._root
        if root is None:
            root = self._root = self.inst.root
        return root.translate(self.inst.imuctr[self.u], iova, length, write)


def build(ctx, spec: dict) -> tuple[Ipmmu, int]:
    """Board entry ``type = "ipmmu"``: ``role = "root"`` (``irq``, ``contexts``) or ``"cache"``
    (``root``, ``utlbs``). The root registers a listener on every domain's P2M."""
    role, utlbs = spec["role"], spec["utlbs"]
    if not 0 <= utlbs <= MAX_UTLBS:
        raise ValueError(f"utlbs must be 0..{MAX_UTLBS}")
    if role == "root":
        contexts = spec["contexts"]
        if not 1 <= contexts <= MAX_CONTEXTS:
            raise ValueError(f"contexts must be 1..{MAX_CONTEXTS} (Gen3 layout)")
        irq = ctx.irq(spec["irq"]) if spec.get("irq") is not None else None
        dev = Ipmmu(spec["name"], role, ctx.walker, contexts, utlbs, irq=irq)
        dev.memory, dev.mem_size = ctx.memory, ctx.memory.size
        dev.wctx = [ctx.alloc_ctx_id() for _ in range(contexts)]
        for dom in ctx.machine.domains.values():
            dom.p2m.listeners.append(functools.partial(dev.p2m_changed, dom.p2m))
    else:
        root = spec.get("root")
        roots = {d["name"] for d in ctx.board.devices if d["type"] == "ipmmu" and d["role"] == "root"}
        if root not in roots:
            raise ValueError(f"a cache IPMMU needs root = one of {sorted(roots)}, not {root!r}")

        def resolve(name: str) -> Ipmmu:
            return ctx.device(name)

        dev = Ipmmu(spec["name"], role, ctx.walker, 0, utlbs, root_name=root, resolve=resolve)
    return dev, WINDOW


DEVICE = DeviceType(
    "ipmmu", build, doc="Renesas IPMMU-VMSA (R-Car Gen3): a root (IPMMU-MM) or a cache instance",
    keys=(Key("role", str, "root", "root owns the contexts; a cache owns uTLBs", choices=("root", "cache")),
          Key("irq", int, None, "fault interrupt line (root)"),
          Key("contexts", int, MAX_CONTEXTS, "contexts of a root, 1..8"),
          Key("utlbs", int, 48, f"micro-TLBs, 0..{MAX_UTLBS}"),
          Key("root", str, None, "the root instance a cache belongs to", ref="device")))
