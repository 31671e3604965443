"""The qtest language: one line at a time, strictly, with line numbers; traces read as a stream.

``parse_line`` turns one line into a tagged tuple with no machine involved; the replayer caches
what it makes of each distinct line, so the strict checks here run once per distinct line, not
once per line. Reading is bounded: a trace is read in blocks, a line longer than ``MAX_LINE`` is
an error (``vmm replay /dev/zero`` fails at line 1 instead of filling memory), and nothing keeps
the lines already replayed.
"""
from __future__ import annotations

import base64
import binascii
import gc
import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("vmm")


EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2
MAX_LINE = 8 << 20                      # characters in one line: `write` data up to 4 MiB a line
MAX_READ = 1 << 20                      # `read`/`b64read` sizes: their reply must fit in a line
BLOCK = 1 << 20                         # characters read at a time

_WIDTH = {"b": 1, "w": 2, "l": 4, "q": 8}
_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}
_HEADER_KEYS = {"board", "p2m", "ram", "skip", "secure"}

# Tags of parse_line results.
REQ, OK, OKV, FAIL, IRQ = "req", "ok", "okv", "fail", "irq"
# Reply kinds: what the value of an ``OK V`` reply is compared with.
R_NONE, R_NUM, R_HEX, R_B64, R_WORD = 0, 1, 2, 3, 4
KINDS = ("mmio", "pio", "memory", "other")
K_MMIO, K_PIO, K_MEMORY, K_OTHER = range(4)


# ------------------------------------------------------------------------------------------
# errors and expectation markers
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
    """What a guest-memory request returns when its range is neither RAM nor a device window."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


class _Succeeded:
    """The expectation of a bare ``OK``: the request must not fail."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return not isinstance(other, _Failed)

    def __ne__(self, other: object) -> bool:
        return isinstance(other, _Failed)

    __hash__ = None  # type: ignore[assignment]


_SUCCEEDED = _Succeeded()


# ------------------------------------------------------------------------------------------
# numbers
def _num(tok: str) -> int:
    """An unsigned number as QEMU's qemu_strtou64(.., 0) takes it (0x hex, leading-0 octal,
    decimal), but strict: no sign, no ``_`` separators, no non-ASCII digits, at most 64 bits."""
    if tok[:2] in ("0x", "0X"):
        digits, base = tok[2:], 16
    elif tok[:1] == "0":
        digits, base = tok, 8
    else:
        digits, base = tok, 10
    if digits.isascii() and digits.isalnum():           # rejects '', '+', '-', '_', ' ', '\u00b2'
        try:
            value = int(digits, base)
        except ValueError:
            value = -1
        if value >= 0:
            if value >> 64:
                raise ValueError(f"{tok[:40]} is wider than 64 bits")
            return value
    if tok[:1] == "-":
        raise ValueError(f"{tok[:40]!r}: negative numbers are not accepted")
    if "_" in tok:
        raise ValueError(f"{tok[:40]!r} is not a number (no '_' separators)")
    raise ValueError(f"{tok[:40]!r} is not a number (0x hex, 0 octal or decimal)")


# ------------------------------------------------------------------------------------------
# requests
def _width_request(cmd: str, words: list[str]) -> tuple:
    n = len(words) - 1
    is_write = cmd[0] in "wo"
    where = "PORT" if cmd[0] in "io" else "ADDR"
    if n != (2 if is_write else 1):
        raise ValueError(f"{cmd} takes {where}{' VAL' if is_write else ''}, got {n} argument(s)")
    size = _WIDTH[cmd[-1]]
    addr = _num(words[1])
    if cmd[0] in "io":
        if size == 8:
            raise ValueError(f"no such request {cmd!r} (port I/O is 1, 2 or 4 bytes)")
        if addr > 0xFFFF:
            raise ValueError(f"port {words[1]} is above 0xffff")
    if is_write:
        return addr, size, _num(words[2]) & ((1 << 8 * size) - 1)      # QEMU truncates to the width
    return addr, size


def _size(tok: str, limit: int | None = None, what: str = "") -> int:
    size = _num(tok)
    if limit is not None and size > limit:
        raise ValueError(f"{what} of {tok} bytes is more than {limit >> 20} MiB (its reply would not fit "
                         "in a line; split it)")
    return size


def _memory_request(cmd: str, words: list[str]) -> tuple:
    n = len(words) - 1
    if cmd in ("read", "b64read"):
        if n != 2:
            raise ValueError(f"{cmd} takes ADDR SIZE")
        return _num(words[1]), _size(words[2], MAX_READ, cmd)
    if cmd == "write":
        if n != 3:
            raise ValueError("write takes ADDR SIZE 0xDATA")
        addr, size, data = _num(words[1]), _size(words[2]), words[3]
        if data[:2] not in ("0x", "0X") or len(data) < 3:
            raise ValueError(f"write data must be 0x followed by hex digits, not {data[:20]!r}")
        hexpart = data[2:]
        if len(hexpart) % 2:
            raise ValueError("write data has an odd number of hex digits")
        if not hexpart.isascii() or not hexpart.isalnum():
            raise ValueError("write data must be 0x followed by hex digits")
        try:
            raw = bytes.fromhex(hexpart)[:size]
        except ValueError:
            raise ValueError("write data must be 0x followed by hex digits") from None
        return addr, size, raw                      # QEMU zero-fills short data up to SIZE
    if cmd == "b64write":
        if n != 3:
            raise ValueError("b64write takes ADDR SIZE BASE64")
        addr, size = _num(words[1]), _size(words[2])
        try:
            raw = base64.b64decode(words[3], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("b64write data is not base64") from None
        raw = raw[:size]                            # QEMU writes min(SIZE, decoded)
        return addr, len(raw), raw
    # memset
    if n != 3:
        raise ValueError("memset takes ADDR SIZE BYTE")
    return _num(words[1]), _size(words[2]), _num(words[3]) & 0xFF


def _other_request(cmd: str, words: list[str]) -> tuple:
    n = len(words) - 1
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
    if n:
        raise ValueError("endianness takes no argument")
    return ()


# cmd -> (argument parser, kind, reply kind): the dispatch on a line's first word.
COMMANDS: dict[str, tuple[Callable[[str, list[str]], tuple], int, int]] = {}
for _w in _WIDTH:
    COMMANDS["read" + _w] = (_width_request, K_MMIO, R_NUM)
    COMMANDS["write" + _w] = (_width_request, K_MMIO, R_NONE)
    COMMANDS["in" + _w] = (_width_request, K_PIO, R_NUM)
    COMMANDS["out" + _w] = (_width_request, K_PIO, R_NONE)
COMMANDS.update({
    "read": (_memory_request, K_MEMORY, R_HEX), "b64read": (_memory_request, K_MEMORY, R_B64),
    "write": (_memory_request, K_MEMORY, R_NONE), "b64write": (_memory_request, K_MEMORY, R_NONE),
    "memset": (_memory_request, K_MEMORY, R_NONE),
    "irq_intercept_in": (_other_request, K_OTHER, R_NONE), "irq_intercept_out": (_other_request, K_OTHER, R_NONE),
    "clock_step": (_other_request, K_OTHER, R_NUM), "clock_set": (_other_request, K_OTHER, R_NUM),
    "endianness": (_other_request, K_OTHER, R_WORD),
})


def expected_value(cmd: str, reply_kind: int, value: str, text: str) -> Any:
    """The value an ``OK VALUE`` reply to ``cmd`` promises (ValueError when it cannot carry one)."""
    if reply_kind == R_NUM:
        return _num(value)
    if reply_kind == R_HEX:
        if value[:2] not in ("0x", "0X"):
            raise ValueError(f"the reply to read is OK 0xHEX, not {text[:60]!r}")
        digits = value[2:]
        if not digits:
            return 0
        if digits.isascii() and digits.isalnum():
            try:
                return int(digits, 16)                 # as wide as the read: no 64-bit limit here
            except ValueError:
                pass
        raise ValueError(f"the reply to read is OK 0xHEX, not {text[:60]!r}")
    if reply_kind == R_B64:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("b64read reply is not base64") from None
    if reply_kind == R_WORD:
        return value
    raise ValueError(f"{cmd} answers a bare OK, not {text[:60]!r}")


# ------------------------------------------------------------------------------------------
# lines
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
            raise ValueError(f"unknown log prefix [{line[1:end][:40]}]")
        line = line[end + 1:].lstrip()
    return line, kind


def parse_line(line: str) -> tuple | None:
    """One line, checked: None (blank, comment, log info), ``(REQ, cmd, args, kind, reply_kind, text)``,
    ``(OK, text)``, ``(OKV, value, text)``, ``(FAIL, text)`` or ``(IRQ, n, level, text)``.
    ValueError says what is wrong."""
    hash_at = line.find("#")
    if hash_at >= 0:
        line = line[:hash_at]
    words = line.split()
    if not words:
        return None
    if words[0][0] == "[":
        line, kind = _strip_prefixes(line.strip())
        if kind == "I":
            return None
        words = line.split()
        if not words:
            return None
    head = words[0]
    text = " ".join(words)
    if head == "OK":
        if len(words) == 1:
            return (OK, text)
        if len(words) > 2:
            raise ValueError(f"reply {text[:60]!r} has more than one value")
        return (OKV, words[1], text)
    if head in ("FAIL", "ERR"):
        return (FAIL, text)
    if head == "IRQ":
        if len(words) != 3 or words[1] not in ("raise", "lower"):
            raise ValueError("an IRQ line is 'IRQ raise N' or 'IRQ lower N'")
        return (IRQ, _num(words[2]), words[1] == "raise", text)
    spec = COMMANDS.get(head)
    if spec is None:
        raise ValueError(f"unknown request {head[:40]!r}")
    return (REQ, head, spec[0](head, words), spec[1], spec[2], text if len(text) <= 200 else text[:200] + "...")


def header_entry(line: str) -> tuple[str, str] | None:
    """``# key: value`` of a header comment line (keys board, p2m, ram, skip, secure), else None."""
    hash_at = line.find("#")
    if hash_at < 0 or line[:hash_at].strip():
        return None
    key, sep, value = line[hash_at + 1:].partition(":")
    key = key.strip().lower()
    return (key, value.strip()) if sep and key in _HEADER_KEYS else None


def blocks(stream: TextIO, name: str) -> Iterator[list[str]]:
    """The stream's lines (without line ends) in lists of about ``BLOCK`` characters.

    Bounded: at most one block and one partial line are held; a line longer than ``MAX_LINE``
    raises TraceError at its number. A UTF-8 byte-order mark at the start is dropped.
    """
    carry = ""
    count = 0
    first = True
    read = stream.read
    while True:
        block = read(BLOCK)
        if not block:
            break
        if first:
            first = False
            if block[0] == "\ufeff":
                block = block[1:]
        parts = (carry + block).split("\n") if carry else block.split("\n")
        carry = parts.pop()
        if len(carry) > MAX_LINE:
            raise TraceError(name, count + len(parts) + 1, f"line longer than {MAX_LINE >> 20} MiB "
                             "(not a text trace?)")
        if parts:
            count += len(parts)
            yield parts
    if carry:
        yield [carry]


def open_text(path: str | Path) -> TextIO:
    """A trace file as text: UTF-8, undecodable bytes replaced, any line ends (OSError if unreadable)."""
    return open(path, encoding="utf-8", errors="replace", newline=None)


def text_stream(text: str) -> TextIO:
    return io.StringIO(text, newline=None)


# ------------------------------------------------------------------------------------------
# traces
class Request:
    """One request line and the reply lines that follow it (what ``parse`` returns)."""

    __slots__ = ("line", "cmd", "kind", "args", "text", "expect", "expect_line", "expect_text", "irqs",
                 "intercepting")

    def __init__(self, line: int, cmd: str, args: tuple, text: str, intercepting: bool, kind: int = K_OTHER) -> None:
        self.line = line
        self.cmd = cmd
        self.kind = KINDS[kind]           # "mmio", "pio", "memory" or "other"
        self.args = args
        self.text = text
        self.expect: Any = None           # int | bytes | str | _Fail | _SUCCEEDED | None
        self.expect_line = 0
        self.expect_text = ""
        self.irqs: list[tuple[int, bool, int, str]] = []    # (line number, level, trace line, text)
        self.intercepting = intercepting  # IRQ edges are checked for this request


class Trace:
    """A trace: its name, header and a way to read it from the start.

    ``read_trace`` gives one that streams its file on every replay (nothing is kept in memory);
    ``parse`` checks the whole text and also keeps ``requests``.
    """

    def __init__(self, name: str, opener: Callable[[], TextIO], header: dict[str, str] | None = None,
                 requests: list[Request] | None = None, lines: int = 0) -> None:
        self.name = name
        self.open = opener
        self.header = header if header is not None else read_header(opener, name)
        self.requests = requests
        self.lines = lines                # counted by parse, or by the last replay


def read_header(opener: Callable[[], TextIO], name: str) -> dict[str, str]:
    """The ``# key: value`` comments before the first request (reads no further than that)."""
    header: dict[str, str] = {}
    with opener() as stream:
        for block in blocks(stream, name):
            for line in block:
                entry = header_entry(line)
                if entry is not None:
                    header[entry[0]] = entry[1]
                elif line.split("#", 1)[0].strip():
                    return header
    return header


def read_trace(path: str | Path) -> Trace:
    """A trace file, streamed when replayed (OSError if unreadable, TraceError for an overlong line)."""
    p = str(path)
    if Path(p).is_dir():
        raise IsADirectoryError(21, "Is a directory", p)
    return Trace(p, lambda: open_text(p))


@contextmanager
def _no_gc() -> Iterator[None]:
    """Parsing allocates many objects that all survive: the cyclic collector would rescan them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse(text: str, name: str = "<trace>") -> Trace:
    """Check a whole trace and keep its requests; raises TraceError naming the first malformed line."""
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
    for block in blocks(text_stream(text), name):
        for line in block:
            lineno += 1
            try:
                p = parse_line(line)
                if p is None:
                    if not requests:
                        entry = header_entry(line)
                        if entry is not None:
                            header[entry[0]] = entry[1]
                    continue
                tag = p[0]
                if tag != REQ:
                    if req is None:
                        raise ValueError(f"reply {p[-1][:60]!r} before any request")
                    if tag == IRQ:
                        if not intercepting and not early_irq:
                            early_irq = lineno
                        req.irqs.append((p[1], p[2], lineno, p[3]))
                        continue
                    if req.expect is not None:
                        raise ValueError(f"a second reply to '{req.text}' (line {req.line}), which already "
                                         f"has one at line {req.expect_line}")
                    req.expect_line, req.expect_text = lineno, p[-1]
                    req.expect = (_Fail(p[1]) if tag == FAIL else _SUCCEEDED if tag == OK
                                  else expected_value(req.cmd, COMMANDS[req.cmd][2], p[1], p[2]))
                    continue
            except ValueError as e:
                raise TraceError(name, lineno, str(e)) from None
            head = p[1]
            if head[:13] == "irq_intercept" and not intercepting:
                if early_irq:
                    raise TraceError(name, early_irq, f"IRQ line before the irq_intercept request at line "
                                     f"{lineno} (edges are checked only from there on)")
                intercepting = True
            req = Request(lineno, head, p[2], p[5], intercepting, p[3])
            append(req)
    if early_irq and not intercepting:
        for r in requests:            # IRQ lines and no intercept request: check edges everywhere
            r.intercepting = True
    return Trace(name, lambda: text_stream(text), header, requests, lineno)
