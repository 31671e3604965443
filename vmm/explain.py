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

from vmm.walker import KIND_NAMES, Fault, Stage
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
        lines.append(f"  stage {s['stage']} level {s['level']}: table {s['table']}[{s['index']}] "
                     f"@ {s['address']} = {desc} ({fields}) -> {s['verdict']}")
    return "\n".join(lines)


def _verdict(step: Step, is_last: bool, fault: Fault | None, stage2: bool) -> str:
    if not is_last or fault is None:
        return "ok"
    if step.descriptor is None:
        return "walk abort: the table is outside machine memory"
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


def explain_walk(memory, s1: Stage | None, s2: Stage | None, iova: int, write: bool) -> tuple[list[dict], str]:
    """Replay a walk over ``memory`` now: (steps as data, the one-line reason)."""
    steps, fault = ReferenceWalker(memory).explain(s1, s2, iova, 2 if write else 1)
    out = []
    for i, st in enumerate(steps):
        stage2 = st.stage == 2 and s2 is not None and (s2.flags & 1)
        out.append({
            "stage": st.stage, "level": st.level, "table": f"{st.table:#x}", "index": st.index,
            "address": f"{st.address:#x}",
            "descriptor": None if st.descriptor is None else f"{st.descriptor:#018x}",
            "fields": {} if st.descriptor is None else decode_descriptor(st.descriptor, st.level, bool(stage2)),
            "verdict": _verdict(st, i == len(steps) - 1, fault, bool(stage2)),
        })
    if fault is None:
        return out, "the walk succeeds now (the tables changed after the fault?)"
    reason = str(fault)
    if not steps and fault.level == 0:
        reason += ": the input address is outside the input range, or the stage's geometry is inconsistent"
    elif fault.s1ptw:
        reason += " (while translating a stage-1 table address through stage 2)"
    return out, reason
