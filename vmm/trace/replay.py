"""Replaying a trace on a machine with no CPU, streamed: memory does not grow with its length.

Each line is looked up in a bounded cache of what it compiled to (a request bound to the
machine, or a reply's expectation), so a line seen before costs a dict lookup; a new line is
checked strictly by ``language.parse_line``. A request is carried out as soon as it is read and
its reply lines are compared as they arrive; what a request must still satisfy when the next one
starts (no further IRQ edges, no unexpected failure) is checked then.
"""
from __future__ import annotations

import base64
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmm.machine import Machine

from vmm.trace.language import (
    EXIT_ERROR,
    EXIT_MISMATCH,
    EXIT_OK,
    FAIL,
    K_MEMORY,
    K_MMIO,
    K_PIO,
    KINDS,
    OK,
    OKV,
    R_HEX,
    R_NUM,
    REQ,
    Trace,
    TraceError,
    _Failed,
    _num,
    blocks,
    expected_value,
    parse_line,
    read_header,
    read_trace,
    text_stream,
)
from vmm.trace.sysmem import Refused, SystemMemory

log = logging.getLogger("vmm")

PROGRESS_MIN_BYTES = 4 << 20           # a progress bar only for traces this big (and a terminal)
CACHE_MAX = 1 << 14                    # distinct lines remembered (then the cache starts over)
CACHE_LINE = 256                       # longer lines (write data) are not remembered
_SKIP = ("skip",)


# ------------------------------------------------------------------------------------------
@dataclass
class ReplayResult:
    """What a replay found. ``status`` is what ``vmm replay`` exits with: 0 every expectation held,
    1 the first mismatch is ``message`` (at ``line``), 2 the trace is malformed, holds no request,
    or asks for something the board cannot do."""

    ok: bool
    status: int
    trace: str
    line: int | None = None
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    exit_status: int | None = None        # value written to the debug-exit port, if any
    seconds: float = 0.0
    faults: list[dict] = field(default_factory=list)             # explained DMA faults (the latest 256)
    crossings: dict[str, int] = field(default_factory=dict)      # isolation watchdog: "device -> owner": n

    def observe(self, machine: Machine) -> ReplayResult:
        """Take the machine's fault explanations and isolation crossings into the result."""
        self.faults = machine.faults()
        self.crossings = {f"{dev} -> {owner}": n for (dev, owner), n in machine.crossings.items()}
        return self

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "trace": self.trace, "line": self.line,
                "message": self.message, "counts": self.counts, "exit_status": self.exit_status,
                "seconds": round(self.seconds, 6), "faults": self.faults, "isolation_crossings": self.crossings}


class _Clock:
    """The virtual clock of clock_step / clock_set (nothing on the board has timers)."""

    def __init__(self) -> None:
        self.ns = 0

    def step(self, ns: int) -> int:
        self.ns += ns
        return self.ns

    def set(self, ns: int) -> int:
        self.ns = max(self.ns, ns)
        return self.ns


def _nothing() -> None:
    return None


def _little() -> str:
    return "little"


class _Progress:
    """A one-line progress bar on a terminal, updated between blocks of lines."""

    def __init__(self, total: int, name: str) -> None:
        self.total = total
        self.name = name
        self.start = time.perf_counter()

    def update(self, done: int, requests: int) -> None:
        frac = min(done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = requests / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.name}: [{bar}] {frac:6.1%} {requests} requests ({rate:,.0f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.flush()


# ------------------------------------------------------------------------------------------
class _LateIntercept(Exception):
    """An irq_intercept request after IRQ lines that assumed a hand-written trace."""


class _Replayer:
    """One replay of one trace on one machine (``run`` is the hot loop)."""

    def __init__(self, machine: Machine, name: str) -> None:
        self.machine = machine
        self.name = name
        self.mem = SystemMemory(machine)
        self.clock = _Clock()
        self.cache: dict[str, tuple] = {}
        self.edges: list[tuple[int, bool]] = []
        self.intercepting = False
        self.handwritten = 0              # line of the first IRQ line seen before any intercept request
        self.unchecked: tuple[str, int, tuple[int, bool]] | None = None   # first unchecked edge
        self.edge_total = 0
        self.lines = 0
        self.requests = 0
        self.expectations = 0
        self.kinds = [0, 0, 0, 0]

    # -- compiling one line ------------------------------------------------------------------
    def compile(self, line: str, lineno: int) -> tuple:
        """What ``line`` does on this machine: ``(REQ, do, kind, text, reply_kind, cmd)`` or a reply
        tuple from ``parse_line``; cached by the line's text."""
        try:
            p = parse_line(line)
        except ValueError as e:
            raise TraceError(self.name, lineno, str(e)) from None
        if p is None:
            c = _SKIP
        elif p[0] == REQ:
            _, cmd, a, kind, reply_kind, text = p
            c = (REQ, self._bind(cmd, a, kind), kind, text, reply_kind, cmd)
        elif p[0] == OKV:                                     # (OKV, word, text, the word as a number)
            try:
                c = (OKV, p[1], p[2], _num(p[1]))
            except ValueError:
                c = (OKV, p[1], p[2], None)
        else:
            c = p
        if len(line) <= CACHE_LINE and "[" not in line:      # log lines carry unique timestamps
            if len(self.cache) >= CACHE_MAX:
                self.cache.clear()
            self.cache[line] = c
        return c

    def _bind(self, cmd: str, a: tuple, kind: int) -> Callable[[], Any]:
        m, mem = self.machine, self.mem
        if kind == K_MMIO:
            return mem.load(*a) if cmd[0] == "r" else mem.store(*a)
        if kind == K_PIO:
            return partial(m.pio_read if cmd[0] == "i" else m.pio_write, *a)
        if cmd == "read":
            reader = mem.reader(a[0], a[1])
            return lambda: int.from_bytes(reader(), "big")
        if cmd == "b64read":
            return mem.reader(a[0], a[1])
        if cmd == "memset":
            return mem.writer(a[0], a[1], b"", a[2])
        if kind == K_MEMORY:                                  # write, b64write
            return mem.writer(a[0], a[1], a[2])
        if cmd == "clock_step":
            return partial(self.clock.step, a[0])
        if cmd == "clock_set":
            return partial(self.clock.set, a[0])
        if cmd == "endianness":
            return _little
        return self._intercept

    def _intercept(self) -> None:
        if self.handwritten:
            raise _LateIntercept
        self.intercepting = True

    # -- the hot loop --------------------------------------------------------------------------
    def run(self, source: Iterable[list[str]], progress: Callable[[list[str], int], None] | None = None
            ) -> tuple[int, int, str] | None:
        """Replay every line; returns None, or ``(status, line, message)`` for the first failure."""
        get = self.cache.get
        compile_line = self.compile
        edges = self.edges
        kinds = self.kinds
        lineno = 0
        nreq = nexp = 0
        cur: tuple = _SKIP
        cur_line = 0
        got: Any = None
        replied = True            # no request yet: a reply now is a stray
        pending = fail_ok = False # pending: the request must be checked when the next one starts
        k = 0                     # IRQ lines of the current request matched so far (k or fail_ok => pending)
        last_irq = 0
        failure = None
        try:
            for block in source:
                for line in block:
                    lineno += 1
                    c = get(line)
                    if c is None:
                        c = compile_line(line, lineno)
                    tag = c[0]
                    if tag is REQ:
                        if pending:
                            failure = self._finish(cur, cur_line, got, fail_ok, k, last_irq)
                            if failure is not None:
                                break
                            pending = fail_ok = False
                            k = 0
                        cur, cur_line, replied = c, lineno, False
                        try:
                            got = c[1]()
                        except Refused as e:
                            got = _Failed(str(e))
                            pending = True
                        nreq += 1
                        kinds[c[2]] += 1
                        if edges:
                            pending = True
                    elif tag is OKV:
                        if replied:
                            failure = self._stray(cur, cur_line, lineno, c[-1])
                            break
                        replied = True
                        nexp += 1
                        if cur[4] == R_NUM and c[3] is not None:
                            if got != c[3]:
                                failure = self._mismatch(cur, cur_line, lineno, c[2], got)
                                break
                        else:
                            failure = self._compare(cur, cur_line, lineno, c, got)
                            if failure is not None:
                                break
                    elif tag is _SKIP[0]:
                        continue
                    elif tag is OK:
                        if replied:
                            failure = self._stray(cur, cur_line, lineno, c[-1])
                            break
                        replied = True
                        nexp += 1
                    elif tag is FAIL:
                        if replied:
                            failure = self._stray(cur, cur_line, lineno, c[-1])
                            break
                        replied = True
                        nexp += 1
                        if got.__class__ is not _Failed:
                            failure = (EXIT_MISMATCH, lineno, f"{self.name}:{lineno}: expected {c[1]}, got "
                                       f"{_show(cur, got)} ({cur[3]}, line {cur_line})")
                            break
                        fail_ok = True
                    else:                                     # IRQ
                        if cur is _SKIP:
                            failure = self._stray(cur, cur_line, lineno, c[-1])
                            break
                        nexp += 1
                        if not self.intercepting:
                            failure = self._start_handwritten(lineno)
                            if failure is not None:
                                break
                        if k >= len(edges):
                            failure = (EXIT_MISMATCH, lineno, f"{self.name}:{lineno}: expected {c[3]}, got no IRQ "
                                       f"({cur[3]}, line {cur_line})")
                            break
                        if edges[k] != (c[1], c[2]):
                            failure = (EXIT_MISMATCH, lineno, f"{self.name}:{lineno}: expected {c[3]}, got "
                                       f"{_irq_text(edges[k])} ({cur[3]}, line {cur_line})")
                            break
                        k += 1
                        last_irq = lineno
                        pending = True
                if failure is not None:
                    break
                if progress is not None:
                    progress(block, nreq)
            else:
                if pending:
                    failure = self._finish(cur, cur_line, got, fail_ok, k, last_irq)
        except TraceError as e:
            failure = (EXIT_ERROR, e.line, str(e))
        except _LateIntercept:
            failure = (EXIT_ERROR, self.handwritten, f"{self.name}:{self.handwritten}: IRQ line before the "
                       f"irq_intercept request at line {lineno} (edges are checked only from there on)")
        except Exception as e:  # a device model fault: report it at its line, not as a traceback
            log.debug("device model raised during replay", exc_info=True)
            text = cur[3] if cur is not _SKIP else "replay"
            failure = (EXIT_ERROR, cur_line, f"{self.name}:{cur_line}: {text}: "
                       f"the device model raised {type(e).__name__}: {e}")
        self.lines = lineno
        self.requests, self.expectations = nreq, nexp
        self.edge_total += len(edges)
        edges.clear()
        return failure

    # -- slow paths ------------------------------------------------------------------------------
    def _compare(self, cur: tuple, cur_line: int, lineno: int, c: tuple, got: Any) -> tuple | None:
        """An ``OK VALUE`` reply to anything but a width read: decode it for this request and compare."""
        try:
            exp = expected_value(cur[5], cur[4], c[1], c[2])
        except ValueError as e:
            return (EXIT_ERROR, lineno, f"{self.name}:{lineno}: {e}")
        if isinstance(got, _Failed):
            return (EXIT_ERROR, cur_line, f"{self.name}:{cur_line}: {cur[3]}: {got.why}")
        if got != exp:
            return self._mismatch(cur, cur_line, lineno, c[2], got)
        return None

    def _mismatch(self, cur: tuple, cur_line: int, lineno: int, text: str, got: Any) -> tuple:
        return (EXIT_MISMATCH, lineno, f"{self.name}:{lineno}: expected {text}, got {_show(cur, got)} "
                f"({cur[3]}, line {cur_line})")

    def _stray(self, cur: tuple, cur_line: int, lineno: int, text: str) -> tuple:
        if cur is _SKIP:
            why = f"reply {text[:60]!r} before any request"
        else:
            why = f"a second reply to '{cur[3]}' (line {cur_line})"
        return (EXIT_ERROR, lineno, f"{self.name}:{lineno}: {why}")

    def _start_handwritten(self, lineno: int) -> tuple | None:
        """The first IRQ line with no intercept request before it: check edges from the first line
        (a hand-written trace), so an earlier request's unexpected edge is a mismatch now."""
        self.intercepting = True
        self.handwritten = lineno
        if self.unchecked is not None:
            text, line, edge = self.unchecked
            return (EXIT_MISMATCH, line, f"{self.name}:{line}: expected no IRQ, got {_irq_text(edge)} "
                    f"({text}, line {line})")
        return None

    def _finish(self, cur: tuple, cur_line: int, got: Any, fail_ok: bool, k: int, last_irq: int
                ) -> tuple | None:
        """What a request must satisfy once its reply lines are over."""
        edges = self.edges
        self.edge_total += len(edges)
        result = None
        if isinstance(got, _Failed) and not fail_ok:
            result = (EXIT_ERROR, cur_line, f"{self.name}:{cur_line}: {cur[3]}: {got.why}")
        elif edges and self.intercepting:
            if k < len(edges):
                line = last_irq if k else cur_line
                result = (EXIT_MISMATCH, line, f"{self.name}:{line}: expected no {'further ' if k else ''}IRQ, "
                          f"got {_irq_text(edges[k])} ({cur[3]}, line {cur_line})")
        elif edges and self.unchecked is None:
            self.unchecked = (cur[3], cur_line, edges[0])
        edges.clear()
        return result

    def counts(self) -> dict[str, int]:
        return {"lines": self.lines, "requests": self.requests, "expectations": self.expectations,
                "irq_edges": self.edge_total, **dict(zip(KINDS, self.kinds, strict=True))}


def _show(cur: tuple, got: Any) -> str:
    """``got`` as the reply line QEMU would print for this request."""
    if isinstance(got, _Failed):
        return f"FAIL {got.why}"
    if got is None:
        return "OK"
    kind, reply_kind = cur[2], cur[4]
    if kind == K_MMIO:
        return f"OK 0x{got:016x}"
    if kind == K_PIO:
        return f"OK 0x{got:04x}"
    if reply_kind == R_HEX:
        return f"OK 0x{got:0{2 * _read_size(cur)}x}"
    if isinstance(got, bytes):
        return "OK " + base64.b64encode(got).decode()
    return f"OK {got}"


def _read_size(cur: tuple) -> int:
    try:
        return _num(cur[3].split()[2])
    except (IndexError, ValueError):
        return 0


def _irq_text(edge: tuple[int, bool]) -> str:
    return f"IRQ {'raise' if edge[1] else 'lower'} {edge[0]}"


# ------------------------------------------------------------------------------------------
def replay_trace(machine: Machine, trace: Trace, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` on ``machine`` with no CPU, streaming it; stops at the first mismatch."""
    t0 = time.perf_counter()
    r = _Replayer(machine, trace.name)
    listen = r.edges.append

    def listener(line: int, level: bool) -> None:
        listen((line, level))

    machine.irqs.listeners.append(listener)
    stop_before = machine.stop_status
    machine.stop_status = None
    bar = None
    try:
        with trace.open() as stream:
            update = None
            if progress:
                total = _stream_size(stream)
                if total >= PROGRESS_MIN_BYTES:
                    bar = _Progress(total, trace.name)
                    done = [0]

                    def update(block: list[str], requests: int) -> None:
                        done[0] += sum(map(len, block)) + len(block)
                        bar.update(done[0], requests)
            failure = r.run(blocks(stream, trace.name), update)
    except OSError as e:
        failure = (EXIT_ERROR, 0, f"{trace.name}: cannot read: {e.strerror or e}")
    finally:
        machine.irqs.listeners.remove(listener)
        if bar:
            bar.close()
    exit_status = machine.stop_status
    if exit_status is None:
        machine.stop_status = stop_before
    trace.lines = r.lines
    counts = r.counts()
    seconds = time.perf_counter() - t0
    if failure is None and r.requests == 0:
        failure = (EXIT_ERROR, None, f"{trace.name}: the trace holds no requests (nothing was checked)")
    if failure is None:
        return ReplayResult(True, EXIT_OK, trace.name, None, "", counts, exit_status, seconds)
    status, line, message = failure
    return ReplayResult(False, status, trace.name, line, message, counts, exit_status, seconds)


def _stream_size(stream: Any) -> int:
    """Characters (or bytes, for a file) the stream holds, for the progress bar; 0 when unknown."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (OSError, ValueError):                      # io.UnsupportedOperation is both
        getvalue = getattr(stream, "getvalue", None)
        return len(getvalue()) if getvalue else 0


def _error_result(e: TraceError) -> ReplayResult:
    return ReplayResult(False, EXIT_ERROR, e.name, e.line, str(e))


def check_header(trace: Trace, machine: Machine) -> str | None:
    """Why ``machine`` is not the machine the trace's header asks for (None when it is)."""
    from vmm import board as boards
    h = trace.header
    spec = machine.board
    if "p2m" in h and h["p2m"] != spec.p2m:
        return f"the trace asks for p2m {h['p2m']}, the machine is {spec.p2m}"
    try:
        secure = header_secure(h)
    except ValueError as e:
        return str(e)
    if secure is not None and secure != spec.secure:
        return f"the trace asks for secure {str(secure).lower()}, the machine's is {str(spec.secure).lower()}"
    if "board" in h and h["board"] not in (spec.name, spec.source):
        return f"the trace asks for board {h['board']}, the machine is {spec.name}"
    if "ram" in h:
        try:
            if boards.parse_size(h["ram"]) != spec.ram:
                return f"the trace asks for ram {h['ram']}, the machine has {spec.ram:#x} bytes"
        except boards.BoardError as e:
            return str(e)
    return None


def _trace_of_text(text: str, name: str) -> Trace:
    return Trace(name, lambda: text_stream(text))


def replay_text(machine: Machine, text: str, name: str = "<trace>", progress: bool = False) -> ReplayResult:
    """Replay trace text on ``machine``; a malformed trace or a header the machine does not match
    gives a status-2 result rather than an exception, so callers print one line."""
    try:
        trace = _trace_of_text(text, name)
    except TraceError as e:
        return _error_result(e)
    why = check_header(trace, machine)
    if why:
        return ReplayResult(False, EXIT_ERROR, name, 0, f"{name}:0: {why}")
    return replay_trace(machine, trace, progress)


def replay_file(machine: Machine, path: str | Path, progress: bool = False) -> ReplayResult:
    """``Machine.replay``: replay a trace file on this machine (OSError if it cannot be read)."""
    try:
        trace = read_trace(path)
    except TraceError as e:
        return _error_result(e)
    why = check_header(trace, machine)
    if why:
        return ReplayResult(False, EXIT_ERROR, trace.name, 0, f"{trace.name}:0: {why}")
    return replay_trace(machine, trace, progress)


def header_secure(h: dict[str, str]) -> bool | None:
    """The ``# secure:`` header as a flag (None when absent); ValueError for anything but a yes or no."""
    value = h.get("secure")
    if value is None:
        return None
    word = value.strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise ValueError(f"header '# secure: {value}' is neither true nor false")


def machine_for(trace: Trace, board: str | None = None, p2m: str | None = None, ram: str | None = None,
                secure: bool | None = None) -> Machine:
    """A fresh machine as the trace's header asks, with explicit arguments taking precedence."""
    from vmm.machine import Machine
    h = trace.header
    if secure is None:
        secure = header_secure(h)
    return Machine.from_board(board or h.get("board") or "rcar-virt", p2m=p2m or h.get("p2m"),
                              ram=ram or h.get("ram"), cpu=False, secure=secure)


def replay_fresh(source: str | Path, board: str | None = None, p2m: str | None = None,
                 ram: str | None = None, name: str | None = None, progress: bool = False,
                 secure: bool | None = None) -> ReplayResult:
    """Replay a trace (a path, or trace text when ``source`` is a str holding a newline or a request)
    on a fresh machine built from its header; what the ``replay`` fixture and .qtrace items use.
    A trace that cannot be read or asks for a machine that cannot be built is a status-2 result."""
    from vmm.board import BoardError
    try:
        if isinstance(source, Path) or ("\n" not in source and (Path(source).is_file() or "/" in source
                                                                 or source.endswith((".qtrace", ".log")))):
            trace = read_trace(source)
            if name:
                trace.name = name
        else:
            trace = _trace_of_text(source, name or "<string>")
    except TraceError as e:
        return _error_result(e)
    except OSError as e:
        return ReplayResult(False, EXIT_ERROR, str(source), None, f"{source}: cannot read: {e.strerror or e}")
    try:
        m = machine_for(trace, board, p2m, ram, secure)
    except (BoardError, OSError, ValueError) as e:         # a header asking for an unbuildable machine
        return ReplayResult(False, EXIT_ERROR, trace.name, 0, f"{trace.name}: {e}")
    try:
        return replay_trace(m, trace, progress).observe(m)
    finally:
        m.close()


__all__ = ["ReplayResult", "check_header", "machine_for", "read_header", "read_trace", "replay_file",
           "replay_fresh", "replay_text", "replay_trace"]
