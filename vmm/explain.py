"""Fault explanations: the master, the address, and the walk that failed, level by level.

An IOMMU fault register says *that* a walk failed and at which level; a driver writer wants to
see *why*: which table was read, which descriptor it held and which of its fields refused the
access, for both stages of a nested walk. When an IOMMU model faults it hands the machine a
``FaultExplanation``; translation walks are replayed by the reference walker
(``ReferenceWalker.explain``) over the tables as they are at the moment of the fault, so the
account is the architecture's reading of the same memory, not a second copy of the C walker.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vmm.walker import BAD_CD, BAD_SUBSTREAM, FETCH_L1, KIND_NAMES, CdTable, Fault, Stage
from vmm.walker.reference import ReferenceWalker, Step

_ADDR = (1 << 48) - 1


def decode_descriptor(desc: int, level: int, stage2: bool) -> dict[str, Any]:
    """The fields of a VMSAv8-64 descriptor that decide a walk (4 KiB granule naming)."""
    kind = desc & 3
    if kind in (0, 2):
        return {"valid": 0}
    fields: dict[str, Any] = {"valid": 1}
    if kind == 3 and level < 3:
        fields["type"] = "table"
        fields["next"] = f"{desc & _ADDR & ~0xFFF:#x}"
        if not stage2:
            fields["NSTable"] = desc >> 63 & 1
            fields["APTable"] = desc >> 61 & 3
        return fields
    fields["type"] = "page" if level == 3 else "block"
    fields["output"] = f"{desc & _ADDR & ~0xFFF:#x}"
    fields["AF"] = desc >> 10 & 1
    if stage2:
        fields["S2AP"] = {0: "none", 1: "read", 2: "write", 3: "read-write"}[desc >> 6 & 3]
    else:
        fields["AP[2] read-only"] = desc >> 7 & 1
        fields["NS"] = desc >> 5 & 1
    if desc >> 40 & 0xFF:
        fields["bits[47:40]"] = f"{desc >> 40 & 0xFF:#x}"
    return fields


def decode_l1cd(desc: int) -> dict[str, Any]:
    """An SMMUv3 L1 CD descriptor: V (bit 0) and L2Ptr (bits [51:12])."""
    return {"V": desc & 1, "L2Ptr": f"{desc & ((1 << 52) - 1) & ~0xFFF:#x}"}


def decode_cd_fields(d0: int, d1: int | None) -> dict[str, Any]:
    """The fields of a CD that decide a PASID translation (facts/pgtable.md section 7)."""
    tg0 = {0: "4K", 1: "64K", 2: "16K", 3: "reserved"}[d0 >> 6 & 3]
    fields: dict[str, Any] = {"V": d0 >> 31 & 1, "T0SZ": d0 & 63, "TG0": tg0, "EPD0": d0 >> 14 & 1,
                              "ENDI": d0 >> 15 & 1, "IPS": d0 >> 32 & 7, "AFFD": d0 >> 35 & 1,
                              "AA64": d0 >> 41 & 1, "ASID": d0 >> 48}
    if d1 is not None:
        fields["TTB0"] = f"{d1 & ((1 << 52) - 1) & ~0xF:#x}"
        fields["HAD0"] = d1 >> 1 & 1
    return fields


def _cd_problem(d0: int) -> str:
    """Which rule makes a CD invalid (the walker only says C_BAD_CD)."""
    t0sz = d0 & 63
    if not d0 >> 31 & 1:
        return "V is 0"
    if not 16 <= t0sz <= 39:
        return f"T0SZ {t0sz} is outside 16..39"
    if d0 >> 6 & 3 == 3:
        return "TG0 is the reserved 0b11"
    if d0 >> 15 & 1:
        return "ENDI is 1 (big-endian tables are not supported)"
    if not d0 >> 41 & 1:
        return "AA64 is 0 (VMSAv8-32 tables are not supported)"
    return "the CD is not valid"


@dataclass
class FaultExplanation:
    """One explained fault; ``as_dict`` is what ``--json`` and the Python API give tools."""

    iommu: str
    iova: int
    access: str                          # "read" or "write"
    status: int                          # what the master sees (dma STATUS)
    reason: str                          # one line: why
    master: str = ""
    context: str = ""                    # "context 1 (stage 2)", "domain 3", ...
    steps: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"iommu": self.iommu, "master": self.master, "iova": f"{self.iova:#x}", "access": self.access,
                "status": self.status, "context": self.context, "reason": self.reason, "walk": self.steps}

    def text(self) -> str:
        return format_fault(self.as_dict())


def format_fault(d: dict[str, Any]) -> str:
    """An explanation (as ``FaultExplanation.as_dict`` gives it) as lines for a terminal."""
    head = (f"fault: {d['master'] or '?'} {d['access']} at {d['iova']} via {d['iommu']}"
            f"{' ' + d['context'] if d['context'] else ''}: {d['reason']} (STATUS {d['status']})")
    lines = [head]
    for s in d["walk"]:
        desc = "unreadable" if s["descriptor"] is None else s["descriptor"]
        fields = ", ".join(f"{k} {v}" for k, v in s["fields"].items())
        what = s.get("what", "walk")
        if what == "walk":
            where = f"stage {s['stage']} level {s['level']}"
        else:
            where = {"l1cd": "L1 CD descriptor", "cd": "context descriptor"}.get(what, what)
            where += f" (IPA {s['ipa']})"
        lines.append(f"  {where}: table {s['table']}[{s['index']}] "
                     f"@ {s['address']} = {desc} ({fields}) -> {s['verdict']}")
    return "\n".join(lines)


def _verdict(step: Step, is_last: bool, fault: Fault | None, stage2: bool) -> str:
    if not is_last or fault is None:
        return "ok"
    if step.descriptor is None:
        return "walk abort: the table is outside machine memory"
    if step.what == "l1cd" and fault.kind == BAD_SUBSTREAM:
        return "bad-substreamid: the L1 descriptor's V is 0"
    if step.what == "cd" and fault.kind == BAD_CD:
        return f"bad-cd: {_cd_problem(step.descriptor)}"
    if step.what != "walk":
        return "ok"
    name = KIND_NAMES.get(fault.kind, str(fault.kind))
    desc = step.descriptor
    if desc & 3 in (0, 2):
        return f"{name} fault: descriptor not valid"
    if fault.kind == 1 and desc & 3 == 1 and step.level == 3:
        return f"{name} fault: reserved encoding at level 3"
    if fault.kind == 3:
        return f"{name} fault: the descriptor does not allow this access"
    if fault.kind == 6:
        return f"{name} fault: NS/NSTable is 0 (the IPMMU's secure-access check)"
    if fault.kind == 4:
        return f"{name} fault: an address above the output size"
    if fault.kind == 2:
        return f"{name} fault: AF is 0"
    return f"{name} fault"


def _steps(steps: list[Step], fault: Fault | None, s2: Stage | None) -> list[dict]:
    out = []
    for i, st in enumerate(steps):
        stage2 = st.stage == 2 and s2 is not None and (s2.flags & 1)
        if st.descriptor is None:
            fields: dict[str, Any] = {}
        elif st.what == "l1cd":
            fields = decode_l1cd(st.descriptor)
        elif st.what == "cd":
            fields = decode_cd_fields(st.descriptor, st.extra)
        else:
            fields = decode_descriptor(st.descriptor, st.level, bool(stage2))
        step = {
            "stage": st.stage, "level": st.level, "table": f"{st.table:#x}", "index": st.index,
            "address": f"{st.address:#x}",
            "descriptor": None if st.descriptor is None else f"{st.descriptor:#018x}",
            "fields": fields,
            "verdict": _verdict(st, i == len(steps) - 1, fault, bool(stage2)),
        }
        if st.what != "walk":
            step["what"] = st.what
            step["ipa"] = f"{st.table_ipa:#x}"
        out.append(step)
    return out


def explain_walk(memory, s1: Stage | None, s2: Stage | None, iova: int, write: bool) -> tuple[list[dict], str]:
    """Replay a walk over ``memory`` now: (steps as data, the one-line reason)."""
    steps, fault = ReferenceWalker(memory).explain(s1, s2, iova, 2 if write else 1)
    out = _steps(steps, fault, s2)
    if fault is None:
        return out, "the walk succeeds now (the tables changed after the fault?)"
    reason = str(fault)
    if not steps and fault.level == 0:
        reason += ": the input address is outside the input range, or the stage's geometry is inconsistent"
    elif fault.s1ptw:
        reason += " (while translating a stage-1 table address through stage 2)"
    return out, reason


def explain_pasid_walk(memory, table: CdTable, s2: Stage, pasid: int, iova: int,
                       write: bool) -> tuple[list[dict], str]:
    """Replay a PASID translation over ``memory`` now, from the PASID to the output: the L1 CD
    descriptor and CD reads (each through stage 2), then the nested stage-1 walk and the stage-2
    walk of its output. The device's caches may hold older CDs or translations than memory
    does; the replay says what the tables say now."""
    steps, fault = ReferenceWalker(memory).explain_pasid(table, s2, pasid, iova, 2 if write else 1)
    out = _steps(steps, fault, s2)
    if fault is None:
        return out, "the walk succeeds now (the tables changed after the fault, or a stale cached CD or translation)"
    if fault.kind == BAD_SUBSTREAM and not fault.fetch:
        return out, f"PASID {pasid} is outside the table (s1cdmax {table.cdmax}: {1 << table.cdmax} CDs)"
    if fault.kind == BAD_SUBSTREAM:
        return out, f"the L1 CD descriptor at IPA {fault.address:#x} is not valid (V = 0)"
    if fault.kind == BAD_CD:
        cd = next((st for st in reversed(steps) if st.what == "cd"), None)
        why = _cd_problem(cd.descriptor) if cd is not None and cd.descriptor is not None else "not valid"
        return out, f"the CD of PASID {pasid} at IPA {fault.address:#x} is invalid: {why}"
    if fault.fetch:
        what = "the L1 CD descriptor" if fault.fetch == FETCH_L1 else "the CD"
        return out, f"{what} at IPA {fault.address:#x} cannot be read through the P2M: {fault}"
    reason = str(fault)
    if fault.stage == 1 and fault.level == 0 and fault.kind == 1:
        cd = next((st for st in steps if st.what == "cd"), None)
        if cd is not None and cd.descriptor is not None and cd.descriptor >> 14 & 1:
            return out, reason + ": the CD has EPD0 = 1 (TTB0 walks disabled)"
        reason += ": the IOVA is outside the CD's input range (T0SZ)"
    elif fault.s1ptw:
        reason += " (while translating a stage-1 table address through the P2M)"
    elif fault.stage == 2:
        reason += " (the stage-1 output is refused by the P2M)"
    return out, reason
