"""Replaying a parsed trace on a machine with no CPU, and the `vmm replay` entry points."""
from __future__ import annotations

import base64
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmm.machine import Machine

from vmm.trace.language import (
    _SUCCEEDED,
    EXIT_ERROR,
    EXIT_MISMATCH,
    EXIT_OK,
    Request,
    Trace,
    TraceError,
    _Fail,
    _Failed,
    _no_gc,
    parse,
)

log = logging.getLogger("vmm")

PROGRESS_MIN_OPS = 100_000              # a progress bar only for traces this long (and a terminal)
CHUNK = 1 << 15                         # requests between progress updates



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
