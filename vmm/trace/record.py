"""Recording a guest run as a trace that replays exactly (a CPU-less twin checks every line)."""
from __future__ import annotations

import copy
import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmm.machine import Machine

from vmm.memory import PAGE
from vmm.trace.language import _SUFFIX

log = logging.getLogger("vmm")



# ------------------------------------------------------------------------------------------
# recording
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int
_ZERO_PAGE = bytes(PAGE)


def resident_pages(machine: Machine, domain: str = "dom0") -> list[int]:
    """GPAs of the guest pages that have ever been touched (mincore on the RAM mapping).

    Untouched pages are zero and, if read, would be allocated; comparing or scanning only these
    keeps a 128 MiB guest from costing 128 MiB of memory.
    """
    dom = machine.domains[domain]
    if dom.ram is None:
        return _resident_through_p2m(machine, dom)
    pages: list[int] = []
    for r in dom.ram.ranges:
        n = r.size // PAGE
        vec = ctypes.create_string_buffer(n)
        if _libc.mincore(r.host, r.size, vec) != 0:
            pages.extend(range(r.gpa, r.gpa + r.size, PAGE))     # cannot tell: every page
            continue
        raw = vec.raw.translate(_BIT0)
        i = raw.find(1)
        while i >= 0:
            pages.append(r.gpa + i * PAGE)
            i = raw.find(1, i + 1)
    return pages


def _resident_through_p2m(machine: Machine, dom) -> list[int]:
    """``resident_pages`` of a machine built without a CPU view: the guest pages whose machine
    frames are resident in the memfd mapping."""
    mem = machine.memory
    vec = ctypes.create_string_buffer(mem.size // PAGE)
    if _libc.mincore(mem.address, mem.size, vec) != 0:
        resident = None
    else:
        resident = vec.raw.translate(_BIT0)
    pages: list[int] = []
    for gpa, size in dom.ram_ranges:
        for i, mpa in enumerate(dom.p2m.lookup_pages(gpa, size // PAGE)):
            if mpa is not None and (resident is None or resident[mpa // PAGE]):
                pages.append(gpa + i * PAGE)
    return pages


_BIT0 = bytes(b & 1 for b in range(256))      # mincore reports residency in bit 0 of each byte


def changed_runs(old: bytes, new: bytes, block: int = 32, gap: int = 16) -> list[tuple[int, int]]:
    """``[start, end)`` byte runs where ``new`` differs from ``old``, runs closer than ``gap`` merged.

    Compares ``block``-byte slices (C memcmp) and trims the ends byte by byte, so a page that
    differs in one stack slot costs a few comparisons, not 4096.
    """
    runs: list[tuple[int, int]] = []
    n = len(new)
    o = 0
    while o < n:
        if old[o:o + block] == new[o:o + block]:
            o += block
            continue
        s = o
        while old[s] == new[s]:
            s += 1
        e = o + block
        while e < n and old[e:e + block] != new[e:e + block]:
            e += block
        o = e
        e = min(e, n)
        while old[e - 1] == new[e - 1]:
            e -= 1
        if runs and s - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def _build_twin(machine: Machine) -> Machine:
    """A CPU-less copy of ``machine``'s board, built as replay builds it. It needs no CPU view of
    its RAM (a scattered P2M costs one host mapping per guest page, and two machines' worth would
    exceed vm.max_map_count), and it keeps quiet: the real machine already said what it has to."""
    from vmm.machine import Machine
    return Machine(copy.deepcopy(machine.board), cpu=False, quiet=True)


class Recorder:
    """Record a guest run as a trace that replays with no CPU (``vmm run IMAGE --record TRACE``).

    An access observer of the machine (``Machine.add_observer``): before each access it writes
    the guest memory the CPU changed, after it the access and its reply; it listens on the IRQ
    lines, asks the runner for dirty-page tracking and sees the CPU come and go. See the package
    docstring for why a twin machine decides which memory goes into the trace.
    """

    needs_dirty_pages = True

    def __init__(self, machine: Machine, path: str | Path | None, note: str = "") -> None:
        self.machine = machine
        self.path = path
        self.lines: list[str] = []
        self.line_count = 0
        self.divergences: list[str] = []
        self.unrepresentable = 0
        self.tail_pages: list[int] = []     # pages the CPU changed after its last access (not recorded)
        self.cpu = None
        self._scan_all = True
        self._edges: list[tuple[int, bool]] = []
        self._twin_edges: list[tuple[int, bool]] = []
        self._out = open(path, "w", encoding="ascii") if path is not None else None
        # The twin: the replay's machine, kept in step line by line.
        self.twin = _build_twin(machine)
        self._twin_p2m = self.twin.dom0.p2m
        self._twin_mem = self.twin.memory.view
        self._views = [(r.gpa, r.size, r.view) for r in machine.dom0.ram.ranges]
        self._twin_access = {"mmio_read": self.twin.mmio_read, "mmio_write": self.twin.mmio_write,
                             "pio_read": self.twin.pio_read, "pio_write": self.twin.pio_write}
        self._closed = False
        machine.irqs.listeners.append(self._edges_listener)
        self.twin.irqs.listeners.append(self._twin_listener)
        machine.add_observer(self)
        spec = machine.board
        from vmm.board import board_paths
        board = spec.name if spec.name in board_paths() else spec.source
        self._emit("# iommu-lab trace recorded by `vmm run --record` (qtest language; replay: vmm replay FILE)")
        if note:
            self._emit(f"# {note}")
        self._emit(f"# board: {board}")
        self._emit(f"# p2m: {spec.p2m}")
        self._emit(f"# ram: {spec.ram >> 20}M" if spec.ram % (1 << 20) == 0 else f"# ram: {spec.ram}")
        if spec.secure:
            self._emit("# secure: true")
        self._emit("irq_intercept_in board")
        self._emit("OK")

    # -- plumbing ---------------------------------------------------------------------------
    def _emit(self, line: str) -> None:
        self.lines.append(line)
        self.line_count += 1
        if len(self.lines) >= 8192 and self._out is not None:
            self._flush_lines()

    def _flush_lines(self) -> None:
        if self._out is not None and self.lines:
            self._out.write("\n".join(self.lines) + "\n")
            self.lines = []

    def _edges_listener(self, line: int, level: bool) -> None:
        self._edges.append((line, level))

    def _twin_listener(self, line: int, level: bool) -> None:
        self._twin_edges.append((line, level))

    def attach_cpu(self, cpu) -> None:
        """The runner's CPU backend exists (with dirty tracking): diff only what it writes from now on."""
        self.cpu = cpu
        self._emit(f"# cpu backend: {getattr(cpu, 'name', '?')}")

    def detach_cpu(self, cpu) -> None:
        """The CPU is about to go: note (not record) what it changed after its last access."""
        if self.cpu is cpu:
            self.tail_pages = [gpa for gpa in cpu.dirty_pages() if self._page_differs(gpa)]
            self.cpu = None

    # -- memory -----------------------------------------------------------------------------
    def _page_views(self, gpa: int) -> tuple[memoryview, int, int]:
        """(run's CPU view, offset of the page in it, the twin's machine address of the page or -1).

        The twin is reached through its P2M (it has no CPU view), as the device side of replay is.
        """
        for start, size, run_view in self._views:
            if start <= gpa < start + size:
                mpa = self._twin_p2m.lookup_pages(gpa, 1)[0]
                return run_view, gpa - start, -1 if mpa is None else mpa
        raise ValueError(f"{gpa:#x} is not guest RAM")

    def _page_differs(self, gpa: int) -> bool:
        rv, o, mpa = self._page_views(gpa)
        return mpa >= 0 and rv[o:o + PAGE].tobytes() != self._twin_mem[mpa:mpa + PAGE].tobytes()

    def _sync(self) -> None:
        """Write the guest memory the CPU changed since the last access, as replay will need it."""
        cpu = self.cpu
        if self._scan_all or cpu is None:
            # First access (the ELF and start_info were placed before the CPU existed), or no CPU
            # (a test driving the machine directly): every page that was ever touched.
            if cpu is not None:
                cpu.dirty_pages()
                self._scan_all = False
            pages = resident_pages(self.machine)
        else:
            pages = cpu.dirty_pages()
            if not pages:
                return
        emit = self._emit
        tv = self._twin_mem
        for gpa in pages:
            rv, o, mpa = self._page_views(gpa)
            if mpa < 0:
                continue                    # not in the P2M: no device can see it
            new = rv[o:o + PAGE].tobytes()
            old = tv[mpa:mpa + PAGE].tobytes()
            if new == old:
                continue
            for s, e in changed_runs(old, new):
                emit(f"write {gpa + s:#x} {e - s:#x} 0x{new[s:e].hex()}")
                tv[mpa + s:mpa + e] = new[s:e]

    # -- accesses ---------------------------------------------------------------------------
    def _access(self, value: int | None, twin_value: int | None, reply: str) -> None:
        for n, level in self._edges:
            self._emit(f"IRQ {'raise' if level else 'lower'} {n}")
        if self._edges != self._twin_edges:
            self._diverged(f"IRQ edges {self._edges} in the run, {self._twin_edges} without a CPU")
        if value != twin_value:
            self._diverged(f"the run read {value:#x}, a CPU-less replay reads {twin_value:#x}")
        self._emit(reply)
        self._edges.clear()
        self._twin_edges.clear()

    def _diverged(self, what: str) -> None:
        msg = f"line {self.line_count}: {what}"
        if not self.divergences:
            log.warning("trace %s will not replay exactly: %s", self.path, msg)
        self.divergences.append(msg)
        self._emit(f"# divergence: {what}")

    def before_access(self) -> None:
        self._sync()
        self._edges.clear()
        self._twin_edges.clear()

    def after_access(self, kind: str, addr: int, size: int, value: int) -> None:
        """The access happened on the real machine: do it on the twin, then write it down."""
        twin = self._twin_access[kind]
        is_read = kind.endswith("read")
        twin_value = twin(addr, size) if is_read else twin(addr, size, value)
        mmio = kind.startswith("mmio")
        if size not in _SUFFIX:
            self._odd(f"{'MMIO' if mmio else 'port'} {'read' if is_read else 'write'}", addr, size)
            return
        word = ("read" if is_read else "write") if mmio else ("in" if is_read else "out")
        if is_read:
            self._emit(f"{word}{_SUFFIX[size]} {addr:#x}")
            self._access(value, twin_value, f"OK 0x{value:016x}" if mmio else f"OK 0x{value:04x}")
        else:
            self._emit(f"{word}{_SUFFIX[size]} {addr:#x} {value & ((1 << 8 * size) - 1):#x}")
            self._access(None, None, "OK")

    def _odd(self, what: str, addr: int, size: int) -> None:
        """qtest has no request for an access of this width: say so in the trace."""
        self.unrepresentable += 1
        self._emit(f"# unrepresentable: {what} of {size} bytes at {addr:#x}")
        self._edges.clear()
        self._twin_edges.clear()

    # -- end --------------------------------------------------------------------------------
    def close(self) -> None:
        """Restore the machine and finish the file (idempotent)."""
        m = self.machine
        if self._closed:
            return
        self._closed = True
        m.remove_observer(self)
        if self._edges_listener in m.irqs.listeners:
            m.irqs.listeners.remove(self._edges_listener)
        if self.divergences:
            self._emit(f"# {len(self.divergences)} divergence(s) from a CPU-less replay while recording")
        self._flush_lines()
        if self._out is not None:
            self._out.close()
        self.twin.close()

    def text(self) -> str:
        """The trace so far (only when recording to memory, ``path=None``)."""
        return "\n".join(self.lines) + "\n"

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
