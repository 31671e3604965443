"""Timelines: a run or a replay as Chrome Trace Event Format JSON (Perfetto, chrome://tracing).

One track per device with its MMIO and port accesses (an access that makes a device copy memory
carries the copy's bytes, pages translated and IOTLB hits and misses), DMA faults on the IOMMU's
track, IRQ edges on the line's owner, and console lines on their own track; timestamps are
microseconds since the timeline started. Events are written as they happen, so a long run costs
file space, not memory; past ``max_events`` the rest are counted and dropped, and the file says so.
"""
from __future__ import annotations

import json
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from vmm.explain import FaultExplanation
    from vmm.machine import Machine

PID = 1


class Timeline:
    """An access observer of a machine that streams trace events to ``path``."""

    needs_dirty_pages = False

    def __init__(self, machine: Machine, path: str, max_events: int = 2_000_000) -> None:
        self.machine = machine
        self.path = path
        self.max_events = max_events
        self.count = 0
        self.dropped = 0
        self._out: IO[str] = open(path, "w", encoding="utf-8")
        self._out.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        self._first = True
        self._t0 = time.perf_counter()
        self._tids: dict[str, int] = {}
        self._irq_owner = {d["irq"]: d["name"] for d in machine.board.devices if d.get("irq") is not None}
        self._console = bytearray()
        self._pending: tuple[float, dict] | None = None
        self._walker = machine.walker
        self._closed = False
        self._track("console")
        machine.irqs.listeners.append(self._irq)
        machine.console_sinks.append(self._console_out)
        machine.fault_listeners.append(self._fault)
        machine.transfer_listeners.append(self._transfer)
        machine.add_observer(self)

    # -- plumbing ---------------------------------------------------------------------------
    def _now(self) -> float:
        return (time.perf_counter() - self._t0) * 1e6

    def _track(self, name: str) -> int:
        tid = self._tids.get(name)
        if tid is None:
            tid = self._tids[name] = len(self._tids) + 1
            self._emit({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": name}},
                       force=True)
        return tid

    def _emit(self, event: dict, force: bool = False) -> None:
        if self._closed:
            return
        if self.count >= self.max_events and not force:
            self.dropped += 1
            return
        self.count += 1
        self._out.write(("" if self._first else ",\n") + json.dumps(event, separators=(",", ":")))
        self._first = False

    # -- observers --------------------------------------------------------------------------
    def before_access(self) -> None:
        stats = self._walker.stats()
        self._pending = (self._now(), stats)

    def after_access(self, kind: str, addr: int, size: int, value: int) -> None:
        start, before = self._pending or (self._now(), self._walker.stats())
        end = self._now()
        bus = self.machine.mmio if kind.startswith("mmio") else self.machine.pio
        hit = bus.find(addr)
        device = hit[3] if hit is not None else "unclaimed"
        offset = addr - hit[0] if hit is not None else addr
        what = "read" if kind.endswith("read") else "write"
        args = {"addr": f"{addr:#x}", "offset": f"{offset:#x}", "size": size, "value": f"{value:#x}"}
        after = self._walker.stats()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        if hits or misses:
            args["iotlb_hits"], args["iotlb_misses"] = hits, misses
            args["walks"] = after["walks"] - before["walks"]
        self._emit({"name": f"{what} +{offset:#x}", "cat": kind, "ph": "X", "pid": PID, "tid": self._track(device),
                    "ts": round(start, 3), "dur": round(max(end - start, 0.001), 3), "args": args})
        self._pending = None

    def attach_cpu(self, cpu) -> None:
        self._emit({"name": f"cpu {getattr(cpu, 'name', '?')}", "ph": "i", "s": "g", "pid": PID,
                    "tid": self._track("console"), "ts": round(self._now(), 3)})

    def detach_cpu(self, cpu) -> None:
        pass

    def _transfer(self, device: str, iova: int, length: int, write: bool, runs: list[tuple[int, int]]) -> None:
        pages = ((iova + length + 4095) >> 12) - (iova >> 12) if length > 0 else 0
        self._emit({"name": f"DMA {'write' if write else 'read'} {length} B", "cat": "dma", "ph": "i", "s": "t",
                    "pid": PID, "tid": self._track(device), "ts": round(self._now(), 3),
                    "args": {"iova": f"{iova:#x}", "bytes": length, "pages": pages, "runs": len(runs),
                             "machine": [f"{m:#x}+{n:#x}" for m, n in runs[:8]]}})

    def _irq(self, line: int, level: bool) -> None:
        owner = self._irq_owner.get(line, f"irq {line}")
        self._emit({"name": f"IRQ {line} {'raise' if level else 'lower'}", "cat": "irq", "ph": "i", "s": "t",
                    "pid": PID, "tid": self._track(owner), "ts": round(self._now(), 3), "args": {"line": line}})

    def _fault(self, expl: FaultExplanation) -> None:
        self._emit({"name": f"fault {expl.access} {expl.iova:#x}", "cat": "fault", "ph": "i", "s": "t",
                    "pid": PID, "tid": self._track(expl.iommu), "ts": round(self._now(), 3),
                    "args": expl.as_dict()})

    def _console_out(self, data: bytes) -> None:
        self._console.extend(data)
        while b"\n" in self._console:
            line, _, rest = bytes(self._console).partition(b"\n")
            self._console = bytearray(rest)
            self._emit({"name": line.decode("utf-8", "replace")[:200], "cat": "console", "ph": "i", "s": "t",
                        "pid": PID, "tid": self._track("console"), "ts": round(self._now(), 3)})

    # -- end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Detach from the machine and finish the JSON (idempotent)."""
        if self._closed:
            return
        m = self.machine
        m.remove_observer(self)
        for lst, item in ((m.irqs.listeners, self._irq), (m.console_sinks, self._console_out),
                          (m.fault_listeners, self._fault), (m.transfer_listeners, self._transfer)):
            if item in lst:
                lst.remove(item)
        if self._console:
            self._console_out(b"\n")
        if self.dropped:
            self._emit({"name": f"{self.dropped} events dropped (max_events {self.max_events})", "ph": "i",
                        "s": "g", "pid": PID, "tid": self._track("console"), "ts": round(self._now(), 3)},
                       force=True)
        self._emit({"name": "process_name", "ph": "M", "pid": PID, "args": {"name": f"iommu-lab {m.board.name}"}},
                   force=True)
        self._closed = True
        self._out.write("\n]}\n")
        self._out.close()

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
