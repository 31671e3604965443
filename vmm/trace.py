"""MMIO traces in QEMU's qtest command language: parse, replay with no CPU, record from a guest run.

A trace is the regression-test currency of the project (DESIGN.md section 4): one request a line,
optionally followed by its reply lines, which replay treats as expectations. QEMU ``-qtest-log``
files are read as they are, so a log captured from QEMU replays here and a trace recorded here
replays in ``qemu -qtest stdio`` (for the requests QEMU's board also has).

Dialect decisions (where qtest leaves room):

- Numbers follow QEMU's ``strtoul(.., 0)``: ``0x`` hex, a leading ``0`` octal, else decimal.
  Replies are compared numerically, so ``OK 0x5`` matches the ``OK 0x0000000000000005`` of a readl.
- A request's reply lines are every ``OK``/``FAIL``/``ERR``/``IRQ`` line up to the next request, in
  any order (QEMU prints the ``IRQ`` lines a request causes before its ``OK``; hand-written traces
  tend to put them after). A bare ``OK`` checks success only; a missing reply checks nothing.
- IRQ edges are checked, as in QEMU, from the first ``irq_intercept_in``/``irq_intercept_out``
  request on (any path: all board lines are intercepted); a trace with IRQ lines but no intercept
  request (the hand-written kind) is checked from its first line. Checked means the edges each
  request causes equal its ``IRQ raise N`` / ``IRQ lower N`` lines, in order, no more and no less.
- ``read``/``write``/``b64*``/``memset`` address guest-physical RAM of dom0 (the CPU's view). An
  address outside RAM is an error (exit 2) unless the trace expects ``FAIL`` there.
- ``#`` starts a comment anywhere on a line. Comment lines of the form ``# key: value`` before the
  first request are the header: ``board``, ``p2m`` and ``ram`` choose the machine a fresh replay
  builds (``vmm replay`` options override them), ``skip`` makes the pytest item skip.
- Log prefixes ``[R +t]``, ``[S +t]``, ``[I t]`` (info, ignored) and the fuzzer's ``[DMA]`` /
  ``[DOUBLE-FETCH]`` tags are stripped.
- A debug-exit write (``outl 0xf4 V``) does not end the replay; V is reported as ``exit_status``.
- ``clock_step [NS]`` / ``clock_set NS`` move a virtual clock no device uses (there are no timers);
  ``endianness`` answers ``little``.

Recording keeps a *twin*: a second, CPU-less machine of the same board, to which every recorded
line is applied as it is written. Before each access the recorder compares the pages the CPU wrote
since the previous access (KVM dirty log / unicorn write hook) with the twin's copy and writes
the differing byte runs as ``write`` lines. So the trace carries exactly the CPU's changes to
memory -- wherever a device may read them by DMA, page-table walk or virtqueue -- while memory that
devices wrote needs no line (the twin's devices wrote it too, as replay's will). Every read is
also checked on the twin as it is recorded, so a trace that would not replay is noticed at once.
"""
from __future__ import annotations

import base64
import binascii
import copy
import ctypes
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmm.machine import Machine

log = logging.getLogger("vmm")

PAGE = 4096
EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2
MAX_BLOB = 1 << 30                      # read/write/memset sizes beyond this are a typo, not a trace
PROGRESS_MIN_OPS = 100_000              # a progress bar only for traces this long (and a terminal)
CHUNK = 1 << 15                         # requests between progress updates

_WIDTH = {"b": 1, "w": 2, "l": 4, "q": 8}
_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}
_HEADER_KEYS = {"board", "p2m", "ram", "skip"}


# ------------------------------------------------------------------------------------------
# parsing
class TraceError(Exception):
    """A malformed trace line, or a request the board cannot carry out; ``str`` is ``TRACE:LINE: why``."""

    def __init__(self, name: str, line: int, reason: str) -> None:
        super().__init__(f"{name}:{line}: {reason}")
        self.name = name
        self.line = line
        self.reason = reason


class _Fail:
    """An expected ``FAIL``/``ERR`` reply: equal to nothing, so the replay loop takes its slow path."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class _Failed:
    """What a guest-memory request returns when its range is not guest RAM."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class _Succeeded:
    """The expectation of a guest-memory request with no reply or a bare ``OK``: it must not fail
    (an address outside RAM is an error even when the trace checks nothing)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return not isinstance(other, _Failed)

    def __ne__(self, other: object) -> bool:
        return isinstance(other, _Failed)

    __hash__ = None  # type: ignore[assignment]


_SUCCEEDED = _Succeeded()


class Request:
    """One request line and the reply lines that follow it."""

    __slots__ = ("line", "cmd", "kind", "args", "text", "expect", "expect_line", "expect_text", "irqs",
                 "intercepting")

    def __init__(self, line: int, cmd: str, args: tuple, text: str, intercepting: bool) -> None:
        self.line = line
        self.cmd = cmd
        self.kind = _kind(cmd)            # "mmio", "pio", "memory" or "other"
        self.args = args
        self.text = text
        self.expect: Any = None           # int | bytes | str | _Fail | None
        self.expect_line = 0
        self.expect_text = ""
        self.irqs: list[tuple[int, bool, int, str]] = []    # (line number, level, trace line, text)
        self.intercepting = intercepting  # IRQ edges are checked for this request


@dataclass
class Trace:
    name: str
    requests: list[Request]
    header: dict[str, str] = field(default_factory=dict)
    lines: int = 0


def _kind(cmd: str) -> str:
    if cmd[-1] in _WIDTH and cmd[:-1] in ("read", "write"):
        return "mmio"
    if cmd[-1] in _WIDTH and cmd[:-1] in ("in", "out"):
        return "pio"
    if cmd in ("read", "write", "b64read", "b64write", "memset"):
        return "memory"
    return "other"


def _num(tok: str) -> int:
    """strtoul(tok, 0): what QEMU's qtest accepts (0x hex, leading-0 octal, decimal)."""
    try:
        if tok[:2] in ("0x", "0X"):
            return int(tok[2:], 16)
        if len(tok) > 1 and tok[0] == "0":
            return int(tok[1:], 8)
        return int(tok, 10)
    except ValueError:
        raise ValueError(f"{tok!r} is not a number (0x hex, 0 octal or decimal)") from None


def _parse_request(cmd: str, words: list[str]) -> tuple:
    """Arguments of one request, checked and converted; ValueError says what is wrong."""
    n = len(words) - 1
    if cmd[:-1] in ("write", "read", "out", "in") and cmd[-1] in _WIDTH:
        is_write = cmd[0] == "w" or cmd[0] == "o"
        where = "PORT" if cmd[0] in "io" else "ADDR"
        if n != (2 if is_write else 1):
            raise ValueError(f"{cmd} takes {where}{' VAL' if is_write else ''}, got {n} argument(s)")
        size = _WIDTH[cmd[-1]]
        if cmd[0] in "io":
            if size == 8:
                raise ValueError(f"no such request {cmd!r} (port I/O is 1, 2 or 4 bytes)")
            port = _num(words[1])
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {words[1]} is above 0xffff")
            return (port, size, _num(words[2]) & ((1 << 8 * size) - 1)) if is_write else (port, size)
        addr = _num(words[1])
        return (addr, size, _num(words[2]) & ((1 << 8 * size) - 1)) if is_write else (addr, size)
    if cmd in ("read", "b64read"):
        if n != 2:
            raise ValueError(f"{cmd} takes ADDR SIZE")
        return _num(words[1]), _size(words[2])
    if cmd == "write":
        if n != 3:
            raise ValueError("write takes ADDR SIZE 0xDATA")
        size, data = _size(words[2]), words[3]
        if data[:2] not in ("0x", "0X") or len(data) < 3:
            raise ValueError(f"write data must be 0x followed by hex digits, not {data[:20]!r}")
        hexpart = data[2:]
        if len(hexpart) % 2:
            raise ValueError("write data has an odd number of hex digits")
        raw = bytes.fromhex(hexpart)[:size]
        return _num(words[1]), raw + bytes(size - len(raw))        # QEMU zero-fills short data
    if cmd == "b64write":
        if n != 3:
            raise ValueError("b64write takes ADDR SIZE BASE64")
        size = _size(words[2])
        try:
            raw = base64.b64decode(words[3], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("b64write data is not base64") from None
        return _num(words[1]), raw[:size]                          # QEMU writes min(SIZE, decoded)
    if cmd == "memset":
        if n != 3:
            raise ValueError("memset takes ADDR SIZE BYTE")
        return _num(words[1]), _size(words[2]), _num(words[3]) & 0xFF
    if cmd in ("irq_intercept_in", "irq_intercept_out"):
        if n not in (1, 2):
            raise ValueError(f"{cmd} takes QOM-PATH [NAME]")
        return tuple(words[1:])
    if cmd == "clock_step":
        if n > 1:
            raise ValueError("clock_step takes [NS]")
        return (_num(words[1]),) if n else (0,)
    if cmd == "clock_set":
        if n != 1:
            raise ValueError("clock_set takes NS")
        return (_num(words[1]),)
    if cmd == "endianness":
        if n:
            raise ValueError("endianness takes no argument")
        return ()
    raise ValueError(f"unknown request {cmd!r}")


def _size(tok: str) -> int:
    size = _num(tok)
    if size > MAX_BLOB:
        raise ValueError(f"size {tok} is larger than 1 GiB")
    return size


def _attach_reply(req: Request, words: list[str], text: str, line: int) -> None:
    """Turn a reply line into the expectation of the request it answers."""
    head = words[0]
    if head == "IRQ":
        if len(words) != 3 or words[1] not in ("raise", "lower"):
            raise ValueError("an IRQ line is 'IRQ raise N' or 'IRQ lower N'")
        req.irqs.append((_num(words[2]), words[1] == "raise", line, text))
        return
    if req.expect is not None:
        raise ValueError(f"a second reply to '{req.text}' (line {req.line}), which already has one "
                         f"at line {req.expect_line}")
    req.expect_line, req.expect_text = line, text
    if head in ("FAIL", "ERR"):
        req.expect = _Fail(text)
        return
    cmd = req.cmd
    if len(words) == 1:
        req.expect = _SUCCEEDED
        return
    if len(words) > 2:
        raise ValueError(f"reply {text!r} has more than one value")
    value = words[1]
    if req.kind in ("mmio", "pio") and cmd[0] in "ri" or cmd in ("clock_step", "clock_set"):
        req.expect = _num(value)
    elif cmd == "read":
        if value[:2] not in ("0x", "0X"):
            raise ValueError(f"the reply to read is OK 0xHEX, not {text!r}")
        req.expect = int(value[2:] or "0", 16)
    elif cmd == "b64read":
        try:
            req.expect = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("b64read reply is not base64") from None
    elif cmd == "endianness":
        req.expect = value
    else:
        raise ValueError(f"{cmd} answers a bare OK, not {text!r}")


def _strip_prefixes(line: str) -> tuple[str, str | None]:
    """Remove -qtest-log prefixes; returns (rest, kind) with kind 'R', 'S', 'I' or None."""
    kind = None
    while line.startswith("["):
        end = line.find("]")
        if end < 0:
            raise ValueError("unterminated [...] prefix")
        tag = line[1:end].split(None, 1)
        tag0 = tag[0] if tag else ""
        if tag0 in ("R", "S", "I"):
            kind = tag0
        elif tag0 not in ("DMA", "DOUBLE-FETCH"):
            raise ValueError(f"unknown log prefix [{line[1:end]}]")
        line = line[end + 1:].lstrip()
    return line, kind


@contextmanager
def _no_gc() -> Iterator[None]:
    """Parsing and compiling allocate millions of objects that all survive: without this, the
    cyclic collector rescans the growing heap again and again (it took 80 % of compile time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse(text: str, name: str = "<trace>") -> Trace:
    """Parse a trace; raises TraceError naming the first malformed line."""
    with _no_gc():
        return _parse(text, name)


def _parse(text: str, name: str) -> Trace:
    requests: list[Request] = []
    header: dict[str, str] = {}
    req: Request | None = None
    intercepting = False
    early_irq = 0                     # first IRQ line seen before any irq_intercept request
    lineno = 0
    append = requests.append
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw
        hash_at = line.find("#")
        if hash_at >= 0:
            if not requests and not line[:hash_at].strip():
                key, sep, value = line[hash_at + 1:].partition(":")
                key = key.strip().lower()
                if sep and key in _HEADER_KEYS:
                    header[key] = value.strip()
            line = line[:hash_at]
        words = line.split()
        if not words:
            continue
        try:
            if line[0] == "[" or words[0][0] == "[":
                line, kind = _strip_prefixes(line.strip())
                if kind == "I":
                    continue
                words = line.split()
                if not words:
                    continue
            head = words[0]
            if head in ("OK", "FAIL", "ERR", "IRQ"):
                if req is None:
                    raise ValueError(f"reply {' '.join(words)!r} before any request")
                if head == "IRQ" and not intercepting and not early_irq:
                    early_irq = lineno
                _attach_reply(req, words, " ".join(words), lineno)
                continue
            args = _parse_request(head, words)
        except ValueError as e:
            raise TraceError(name, lineno, str(e)) from None
        if head[:13] == "irq_intercept" and not intercepting:
            if early_irq:
                raise TraceError(name, early_irq, f"IRQ line before the irq_intercept request at line {lineno} "
                                 "(edges are checked only from there on)")
            intercepting = True
        req = Request(lineno, head, args, " ".join(words), intercepting)
        append(req)
    if early_irq and not intercepting:
        for r in requests:            # IRQ lines and no intercept request: check edges everywhere
            r.intercepting = True
    return Trace(name, requests, header, lineno)


# ------------------------------------------------------------------------------------------
# replay
@dataclass
class ReplayResult:
    """What a replay found. ``status`` is what ``vmm replay`` exits with: 0 every expectation held,
    1 the first mismatch is ``message`` (at ``line``), 2 the trace is malformed or asks for
    something the board cannot do."""

    ok: bool
    status: int
    trace: str
    line: int | None = None
    message: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    exit_status: int | None = None        # value written to the debug-exit port, if any
    seconds: float = 0.0

    def __bool__(self) -> bool:
        return self.ok

    def as_dict(self) -> dict:
        return {"ok": self.ok, "status": self.status, "trace": self.trace, "line": self.line,
                "message": self.message, "counts": self.counts, "exit_status": self.exit_status,
                "seconds": round(self.seconds, 6)}


def _guest_ops(machine: Machine):
    """Closures over dom0's RAM that report a range outside RAM instead of raising."""
    dom = machine.dom0

    def write(gpa: int, data: bytes):
        try:
            dom.write(gpa, data)
        except ValueError as e:
            return _Failed(str(e))
        return None

    def read_int(gpa: int, size: int):
        try:
            return int.from_bytes(dom.read(gpa, size), "big")
        except ValueError as e:
            return _Failed(str(e))

    def read_bytes(gpa: int, size: int):
        try:
            return dom.read(gpa, size)
        except ValueError as e:
            return _Failed(str(e))

    return write, read_int, read_bytes


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


Op = tuple[Callable[[], Any], Any, Any, int]     # (do, expectation, expected IRQ edges, request index)


def compile_trace(trace: Trace, machine: Machine) -> list[Op]:
    """Turn parsed requests into ``(do, expect, irqs, index)`` tuples, so replay is one tight loop.

    ``do()`` performs the request and returns what the reply would carry; ``expect`` is compared
    with ``!=`` (None: nothing to check); ``irqs`` is None while IRQs are not intercepted, else the
    tuple of ``(line, level)`` edges the request must cause.
    """
    with _no_gc():
        return _compile(trace, machine)


def _compile(trace: Trace, machine: Machine) -> list[Op]:
    mmio_read, mmio_write = machine.mmio_read, machine.mmio_write
    pio_read, pio_write = machine.pio_read, machine.pio_write
    gwrite, gread_int, gread_bytes = _guest_ops(machine)
    clock = _Clock()
    ops: list[Op] = []
    append = ops.append
    nothing = _nothing
    for i, r in enumerate(trace.requests):
        cmd, a, expect, kind = r.cmd, r.args, r.expect, r.kind
        if kind == "mmio":
            do = partial(mmio_read if cmd[0] == "r" else mmio_write, *a)
        elif kind == "pio":
            do = partial(pio_read if cmd[0] == "i" else pio_write, *a)
        elif cmd == "write":
            do = partial(gwrite, a[0], a[1]) if a[1] else nothing
            expect = expect if expect is not None else _SUCCEEDED
        elif cmd == "b64write":
            do = partial(gwrite, a[0], a[1]) if a[1] else nothing
            expect = expect if expect is not None else _SUCCEEDED
        elif cmd == "memset":
            do = partial(gwrite, a[0], bytes([a[2]]) * a[1]) if a[1] else nothing
            expect = expect if expect is not None else _SUCCEEDED
        elif cmd == "read":
            do = partial(gread_int, a[0], a[1])
            expect = expect if expect is not None else _SUCCEEDED
        elif cmd == "b64read":
            do = partial(gread_bytes, a[0], a[1])
            expect = expect if expect is not None else _SUCCEEDED
        elif cmd == "clock_step":
            do = partial(clock.step, a[0])
        elif cmd == "clock_set":
            do = partial(clock.set, a[0])
        elif cmd == "endianness":
            do = _little
        else:                                   # irq_intercept_*: always succeeds
            do = nothing
        if expect is _SUCCEEDED and kind != "memory":
            expect = None                       # a bare OK after a request that cannot fail
        irqs = tuple((n, lvl) for n, lvl, _, _ in r.irqs) if r.intercepting else None
        append((do, expect, irqs, i))
    return ops


def _show(req: Request, got: Any) -> str:
    """``got`` as the reply line QEMU would print for this request."""
    if isinstance(got, _Failed):
        return f"FAIL {got.why}"
    cmd = req.cmd
    if got is None:
        return "OK"
    if req.kind == "mmio":
        return f"OK 0x{got:016x}"
    if req.kind == "pio":
        return f"OK 0x{got:04x}"
    if cmd == "read":
        return f"OK 0x{got:0{2 * req.args[1]}x}"
    if cmd == "b64read":
        return "OK " + base64.b64encode(got).decode()
    return f"OK {got}"


def _irq_text(edge: tuple[int, bool]) -> str:
    return f"IRQ {'raise' if edge[1] else 'lower'} {edge[0]}"


class _Progress:
    """A one-line progress bar on a terminal; replay updates it between chunks, never per request."""

    def __init__(self, total: int, name: str) -> None:
        self.total = total
        self.name = name
        self.start = time.perf_counter()

    def update(self, done: int) -> None:
        frac = done / self.total if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r{self.name}: [{bar}] {frac:6.1%} {done}/{self.total} requests ({rate:,.0f}/s)")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.flush()


def replay_trace(machine: Machine, trace: Trace, progress: bool = False, ops: list[Op] | None = None) -> ReplayResult:
    """Replay a parsed trace on ``machine`` with no CPU; stops at the first mismatch.

    ``ops`` may be ``compile_trace(trace, machine)`` done beforehand (benchmarks, repeated replays).
    """
    t0 = time.perf_counter()
    if ops is None:
        ops = compile_trace(trace, machine)
    reqs = trace.requests
    edges: list[tuple[int, bool]] = []
    seen = [0]

    def listen(line: int, level: bool) -> None:
        edges.append((line, level))
        seen[0] += 1

    machine.irqs.listeners.append(listen)
    stop_before = machine.stop_status
    machine.stop_status = None
    bar = _Progress(len(ops), trace.name) if progress and len(ops) >= PROGRESS_MIN_OPS else None
    chunks = [ops] if bar is None else [ops[b:b + CHUNK] for b in range(0, len(ops), CHUNK)]
    failure: tuple[int, int, str] | None = None      # (status, line, message)
    idx = 0
    try:
        for chunk in chunks:
            for do, expect, irqs, idx in chunk:      # the hot loop: keep it this small
                got = do()
                if expect is not None and got != expect:
                    failure = _judge(trace, reqs[idx], expect, got)
                    if failure is not None:
                        break
                if edges or irqs:
                    if irqs is not None and tuple(edges) != irqs:
                        failure = _irq_mismatch(trace, reqs[idx], edges)
                        break
                    edges.clear()
            if failure is not None:
                break
            if bar:
                bar.update(min(idx + 1, len(ops)))
    except Exception as e:  # a device model fault: report it at its line, not as a traceback
        req = reqs[idx] if reqs else None
        log.debug("device model raised during replay", exc_info=True)
        line = req.line if req else 0
        failure = (EXIT_ERROR, line, f"{trace.name}:{line}: {req.text if req else 'replay'}: "
                   f"the device model raised {type(e).__name__}: {e}")
    finally:
        machine.irqs.listeners.remove(listen)
        if bar:
            bar.close()
    exit_status = machine.stop_status
    if exit_status is None:
        machine.stop_status = stop_before
    counts = _counts(trace, idx + 1 if failure else len(ops), seen[0])
    seconds = time.perf_counter() - t0
    if failure is None:
        return ReplayResult(True, EXIT_OK, trace.name, None, "", counts, exit_status, seconds)
    status, line, message = failure
    return ReplayResult(False, status, trace.name, line, message, counts, exit_status, seconds)


def _judge(trace: Trace, req: Request, expect: Any, got: Any) -> tuple[int, int, str] | None:
    """The slow path of a failed ``!=``: an expected FAIL that happened, a mismatch, or an error."""
    if isinstance(expect, _Fail):
        if isinstance(got, _Failed):
            return None
        return (EXIT_MISMATCH, req.expect_line,
                f"{trace.name}:{req.expect_line}: expected {expect.text}, got {_show(req, got)} "
                f"({req.text}, line {req.line})")
    if isinstance(got, _Failed):
        return (EXIT_ERROR, req.line, f"{trace.name}:{req.line}: {req.text}: {got.why}")
    return (EXIT_MISMATCH, req.expect_line,
            f"{trace.name}:{req.expect_line}: expected {req.expect_text}, got {_show(req, got)} "
            f"({req.text}, line {req.line})")


def _irq_mismatch(trace: Trace, req: Request, edges: list[tuple[int, bool]]) -> tuple[int, int, str]:
    for k, exp in enumerate(req.irqs):
        if k >= len(edges):
            return (EXIT_MISMATCH, exp[2], f"{trace.name}:{exp[2]}: expected {exp[3]}, got no IRQ "
                    f"({req.text}, line {req.line})")
        if (exp[0], exp[1]) != edges[k]:
            return (EXIT_MISMATCH, exp[2], f"{trace.name}:{exp[2]}: expected {exp[3]}, got {_irq_text(edges[k])} "
                    f"({req.text}, line {req.line})")
    extra = edges[len(req.irqs)]
    line = req.irqs[-1][2] if req.irqs else req.line
    return (EXIT_MISMATCH, line, f"{trace.name}:{line}: expected no {'further ' if req.irqs else ''}IRQ, "
            f"got {_irq_text(extra)} ({req.text}, line {req.line})")


def _counts(trace: Trace, done: int, edges: int) -> dict[str, int]:
    """Requests carried out (all of them, or up to and including the failing one) and what they checked."""
    kinds = {"mmio": 0, "pio": 0, "memory": 0, "other": 0}
    checked = 0
    for r in trace.requests[:done]:
        kinds[r.kind] += 1
        checked += (r.expect is not None) + len(r.irqs)
    return {"lines": trace.lines, "requests": done, "expectations": checked, "irq_edges": edges, **kinds}


# ------------------------------------------------------------------------------------------
# entry points
def read_trace(path: str | Path) -> Trace:
    """Read and parse a trace file (OSError if unreadable, TraceError if malformed)."""
    p = Path(path)
    return parse(p.read_text(encoding="utf-8", errors="replace"), str(path))


def _error_result(e: TraceError) -> ReplayResult:
    return ReplayResult(False, EXIT_ERROR, e.name, e.line, str(e))


def check_header(trace: Trace, machine: Machine) -> str | None:
    """Why ``machine`` is not the machine the trace's header asks for (None when it is)."""
    from vmm import board as boards
    h = trace.header
    spec = machine.board
    if "p2m" in h and h["p2m"] != spec.p2m:
        return f"the trace asks for p2m {h['p2m']}, the machine is {spec.p2m}"
    if "board" in h and h["board"] not in (spec.name, spec.source):
        return f"the trace asks for board {h['board']}, the machine is {spec.name}"
    if "ram" in h:
        try:
            if boards.parse_size(h["ram"]) != spec.ram:
                return f"the trace asks for ram {h['ram']}, the machine has {spec.ram:#x} bytes"
        except boards.BoardError as e:
            return str(e)
    return None


def replay_text(machine: Machine, text: str, name: str = "<trace>", progress: bool = False) -> ReplayResult:
    """Replay trace text on ``machine``; a malformed trace or a header the machine does not match
    gives a status-2 result rather than an exception, so callers print one line."""
    try:
        trace = parse(text, name)
    except TraceError as e:
        return _error_result(e)
    why = check_header(trace, machine)
    if why:
        return ReplayResult(False, EXIT_ERROR, name, 0, f"{name}:0: {why}")
    return replay_trace(machine, trace, progress)


def replay_file(machine: Machine, path: str | Path, progress: bool = False) -> ReplayResult:
    """``Machine.replay``: replay a trace file on this machine (OSError if it cannot be read)."""
    p = Path(path)
    return replay_text(machine, p.read_text(encoding="utf-8", errors="replace"), str(path), progress)


def machine_for(trace: Trace, board: str | None = None, p2m: str | None = None, ram: str | None = None) -> Machine:
    """A fresh machine as the trace's header asks, with explicit arguments taking precedence."""
    from vmm.machine import Machine
    h = trace.header
    return Machine.from_board(board or h.get("board") or "rcar-virt", p2m=p2m or h.get("p2m"),
                              ram=ram or h.get("ram"))


def replay_fresh(source: str | Path, board: str | None = None, p2m: str | None = None,
                 ram: str | None = None, name: str | None = None, progress: bool = False) -> ReplayResult:
    """Replay a trace (a path, or trace text when ``source`` is a str holding a newline or a request)
    on a fresh machine built from its header; what the ``replay`` fixture and .qtrace items use."""
    if isinstance(source, Path) or ("\n" not in source and (Path(source).is_file() or "/" in source
                                                             or source.endswith((".qtrace", ".log")))):
        name = name or str(source)
        text = Path(source).read_text(encoding="utf-8", errors="replace")
    else:
        text, name = source, name or "<string>"
    try:
        trace = parse(text, name)
    except TraceError as e:
        return _error_result(e)
    m = machine_for(trace, board, p2m, ram)
    try:
        return replay_trace(m, trace, progress)
    finally:
        m.close()


def main_replay(args) -> int:
    """``vmm replay TRACE [--board B] [--p2m P] [--json]``.

    Options given on the command line win over the trace header; ``--board rcar-virt`` is also the
    default, so a header naming another board is followed unless the option names one too.
    """
    try:
        trace = read_trace(args.trace)
    except OSError as e:
        return _report(args, ReplayResult(False, EXIT_ERROR, args.trace, None,
                                          f"{args.trace}: cannot read: {e.strerror or e}"))
    except TraceError as e:
        return _report(args, _error_result(e))
    board = args.board if args.board != "rcar-virt" else None
    m = machine_for(trace, board, args.p2m)
    try:
        result = replay_trace(m, trace, progress=not args.json and sys.stderr.isatty())
    finally:
        m.close()
    return _report(args, result)


def _report(args, result: ReplayResult) -> int:
    if getattr(args, "json", False):
        print(json.dumps(result.as_dict()))
    elif result.ok:
        c = result.counts
        extra = f", debug exit {result.exit_status}" if result.exit_status is not None else ""
        print(f"{result.trace}: ok: {c['requests']} requests, {c['expectations']} expectations held, "
              f"{c['irq_edges']} IRQ edges{extra} ({result.seconds:.3f} s)")
    else:
        print(result.message, file=sys.stderr)
    return result.status


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
    pages: list[int] = []
    for r in machine.domains[domain].ram.ranges:
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


class _NoCpuRam:
    """Stands in for ``GuestRam`` in the recorder's twin. The twin has no CPU, so it needs no host
    mapping of its RAM -- and a scattered P2M costs one mapping per guest page, so two machines'
    worth exceeds vm.max_map_count (65530). The twin's memory is reached through its P2M instead."""

    def __init__(self, memfd: int, ranges: list[tuple[int, int]], lookup: Callable) -> None:
        self.ranges: list = []

    def find(self, gpa: int) -> None:
        return None

    def remap(self, gpa: int, size: int) -> None:
        pass

    def close(self) -> None:
        pass


def _build_twin(machine: Machine) -> Machine:
    """A CPU-less copy of ``machine``'s board, built as replay builds it, minus the CPU view of RAM."""
    import vmm.machine as vm
    quiet = logging.getLogger("vmm")
    level = quiet.level
    quiet.setLevel(logging.ERROR)       # its wiring warnings were already printed for the real machine
    real_ram, vm.GuestRam = vm.GuestRam, _NoCpuRam
    try:
        twin = vm.Machine(copy.deepcopy(machine.board))
    finally:
        vm.GuestRam = real_ram
        quiet.setLevel(level)
    for bus in (twin.mmio, twin.pio):
        bus._unclaimed = lambda *a: None   # the run's bus already logs each unclaimed access once
    return twin


class Recorder:
    """Record a guest run as a trace that replays with no CPU (``vmm run IMAGE --record TRACE``).

    Wraps the machine's ``mmio_read/mmio_write/pio_read/pio_write`` instance attributes (what the
    backends call), listens on the IRQ lines, and sets ``machine.recorder`` so the runner turns on
    dirty tracking and calls ``attach``/``detach`` around the CPU's life. See the module docstring
    for why a twin machine decides which memory goes into the trace.
    """

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
        self._orig = (machine.mmio_read, machine.mmio_write, machine.pio_read, machine.pio_write)
        machine.mmio_read = self._mmio_read
        machine.mmio_write = self._mmio_write
        machine.pio_read = self._pio_read
        machine.pio_write = self._pio_write
        machine.irqs.listeners.append(self._edges_listener)
        self.twin.irqs.listeners.append(self._twin_listener)
        machine.recorder = self
        spec = machine.board
        from vmm.board import board_paths
        board = spec.name if spec.name in board_paths() else spec.source
        self._emit("# iommu-lab trace recorded by `vmm run --record` (qtest language; replay: vmm replay FILE)")
        if note:
            self._emit(f"# {note}")
        self._emit(f"# board: {board}")
        self._emit(f"# p2m: {spec.p2m}")
        self._emit(f"# ram: {spec.ram >> 20}M" if spec.ram % (1 << 20) == 0 else f"# ram: {spec.ram}")
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

    def attach(self, cpu) -> None:
        """The runner's CPU backend exists (with dirty tracking): diff only what it writes from now on."""
        self.cpu = cpu
        self._emit(f"# cpu backend: {getattr(cpu, 'name', '?')}")

    def detach(self, cpu) -> None:
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

    def _mmio_read(self, addr: int, size: int) -> int:
        self._sync()
        self._edges.clear()
        self._twin_edges.clear()
        value = self._orig[0](addr, size)
        twin_value = self.twin.mmio_read(addr, size)
        if size not in _SUFFIX:
            self._odd("MMIO read", addr, size)
            return value
        self._emit(f"read{_SUFFIX[size]} {addr:#x}")
        self._access(value, twin_value, f"OK 0x{value:016x}")
        return value

    def _mmio_write(self, addr: int, size: int, value: int) -> None:
        self._sync()
        self._edges.clear()
        self._twin_edges.clear()
        self._orig[1](addr, size, value)
        self.twin.mmio_write(addr, size, value)
        if size not in _SUFFIX:
            self._odd("MMIO write", addr, size)
            return
        self._emit(f"write{_SUFFIX[size]} {addr:#x} {value & ((1 << 8 * size) - 1):#x}")
        self._access(None, None, "OK")

    def _pio_read(self, port: int, size: int) -> int:
        self._sync()
        self._edges.clear()
        self._twin_edges.clear()
        value = self._orig[2](port, size)
        twin_value = self.twin.pio_read(port, size)
        self._emit(f"in{_SUFFIX[size]} {port:#x}")
        self._access(value, twin_value, f"OK 0x{value:04x}")
        return value

    def _pio_write(self, port: int, size: int, value: int) -> None:
        self._sync()
        self._edges.clear()
        self._twin_edges.clear()
        self._orig[3](port, size, value)
        self.twin.pio_write(port, size, value)
        self._emit(f"out{_SUFFIX[size]} {port:#x} {value & ((1 << 8 * size) - 1):#x}")
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
        if getattr(m, "recorder", None) is not self:
            return
        for name in ("mmio_read", "mmio_write", "pio_read", "pio_write"):
            m.__dict__.pop(name, None)
        if self._edges_listener in m.irqs.listeners:
            m.irqs.listeners.remove(self._edges_listener)
        del m.recorder
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
