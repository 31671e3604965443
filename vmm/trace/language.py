"""The qtest language: requests, their reply lines (expectations), headers; parsing with line numbers."""
from __future__ import annotations

import base64
import binascii
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vmm")


EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2
MAX_BLOB = 1 << 30                      # read/write/memset sizes beyond this are a typo, not a trace

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


class _NeverEqual:
    """Equal to nothing, so the replay loop's fast ``got == expect`` check sends it to the slow path."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __ne__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


class _Fail(_NeverEqual):
    """An expected ``FAIL``/``ERR`` reply."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Failed(_NeverEqual):
    """What a guest-memory request returns when its range is not guest RAM."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


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
