"""A GDB remote stub for the guest vCPU: ``vmm run IMAGE --gdb [HOST:]PORT [--gdb-wait]``.

GDB's remote serial protocol over TCP, so a stock ``gdb`` attaches with ``target remote``, as it
does to QEMU's ``-s -S``. The stub sends a target description (``target.xml``): i386:x86-64 with
the core, SSE and segment-base features GDB's amd64 support expects, plus the control registers.
The 64-bit register set is reported in every CPU mode, as QEMU does for x86_64 targets, so the
32-bit PVH entry code shows up in the same registers (its upper halves zero) as the long-mode code
after it; GDB disassembles the entry code as 64-bit (``set architecture i386`` shows it as 32-bit).
The x87 and SSE registers are reported unavailable (the payloads are built -mgeneral-regs-only).

Memory is read and written by guest-virtual address, translated through the guest's page tables
when paging is on (4-level, PAE or 2-level, from CR0/CR4/EFER), identity when it is off, and only
guest RAM is reachable: device registers are not read behind the guest's back (``E14``).

One client at a time. The guest runs on the calling thread; a thread per connection reads the
socket, so Ctrl-C (the 0x03 byte) reaches a running guest, and a lost connection detaches: the
breakpoints go and the guest runs on to its end. Without ``--gdb-wait`` the guest starts at once and
a client that connects later stops it where it is. A malformed packet gets ``E01``, an unknown one
the empty reply, and neither ends the run. ``--timeout`` counts only the time the guest runs, never
the time it sits stopped in the debugger.

How a run ends, as GDB sees it: the debug-exit port ends it with ``W<status>`` (exit code); a
triple fault, a CPU exception or an emulator error first stops it with SIGSEGV, a halt with SIGTRAP,
the timeout with SIGALRM (registers still readable, the reason in an ``O`` console line), and the
next resume ends it (``X<signal>``) with vmm's usual status; ``kill`` ends it with status 130.
"""
from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass

from vmm.backends import DEBUG_WRITABLE, HW_BREAKPOINTS, DebugCpu, DebugStop, RunResult

log = logging.getLogger("vmm")

EXIT_KILLED = 130           # `kill` from the debugger: the status of an interrupted run
PACKET_MAX = 0x4000         # PacketSize we announce; longer input is refused
SIGINT, SIGTRAP, SIGSEGV, SIGALRM = 2, 5, 11, 14     # GDB's signal numbers
END_SIGNALS = {"halt": SIGTRAP, "timeout": SIGALRM}  # anything else that is not an exit: SIGSEGV
PAGE = 0x1000


class GdbError(Exception):
    """A --gdb address that cannot be parsed or listened on."""


# -- the register set ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    group: str = ""


_GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
CORE = ([Reg(n, 64, {"rbp": "data_ptr", "rsp": "data_ptr"}.get(n, "int64")) for n in _GPRS]
        + [Reg("rip", 64, "code_ptr"), Reg("eflags", 32, "i386_eflags")]
        + [Reg(n, 32, "int32") for n in ("cs", "ss", "ds", "es", "fs", "gs")]
        + [Reg(f"st{i}", 80, "i387_ext") for i in range(8)]
        + [Reg(n, 32, "int", "float") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg",
                                                "fooff", "fop")])
SSE = [Reg(f"xmm{i}", 128, "vec128", "vector") for i in range(16)] + [Reg("mxcsr", 32, "i386_mxcsr", "vector")]
SEGMENTS = [Reg("fs_base", 64, "int"), Reg("gs_base", 64, "int")]
SYSTEM = [Reg(n, 64, "int64", "system") for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
REGISTERS = CORE + SSE + SEGMENTS + SYSTEM
_INDEX = {r.name: i for i, r in enumerate(REGISTERS)}

_EFLAGS = ("CF:0 :1 PF:2 AF:4 ZF:6 SF:7 TF:8 IF:9 DF:10 OF:11 NT:14 RF:16 VM:17 AC:18 VIF:19 VIP:20 "
           "ID:21").split()
_MXCSR = "IE:0 DE:1 ZE:2 OE:3 UE:4 PE:5 DAZ:6 IM:7 DM:8 ZM:9 OM:10 UM:11 PM:12 FZ:15".split()


def _flags(name: str, fields: list[str]) -> str:
    body = "".join(f'<field name="{f.split(":")[0]}" start="{f.split(":")[1]}" end="{f.split(":")[1]}"/>'
                   for f in fields)
    return f'<flags id="{name}" size="4">{body}</flags>'


def _feature(name: str, regs: list[Reg], types: str = "") -> str:
    out = []
    for r in regs:
        group = f' group="{r.group}"' if r.group else ""
        out.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{_INDEX[r.name]}"{group}/>')
    return f'<feature name="{name}">{types}{"".join(out)}</feature>'


_VEC128 = ('<vector id="v8bf16" type="bfloat16" count="8"/><vector id="v4f" type="ieee_single" count="4"/>'
           '<vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/>'
           '<vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/>'
           '<vector id="v2i64" type="int64" count="2"/><union id="vec128"><field name="v8_bfloat16" '
           'type="v8bf16"/><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
           '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field '
           'name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" '
           'type="uint128"/></union>')

TARGET_XML = ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">'
              "<architecture>i386:x86-64</architecture>"
              + _feature("org.gnu.gdb.i386.core", CORE, _flags("i386_eflags", _EFLAGS))
              + _feature("org.gnu.gdb.i386.sse", SSE, _VEC128 + _flags("i386_mxcsr", _MXCSR))
              + _feature("org.gnu.gdb.i386.segments", SEGMENTS)
              + _feature("org.iommu-lab.x86.system", SYSTEM)
              + "</target>").encode()


def encode_registers(values: dict[str, int]) -> str:
    """The ``g`` reply: every register in target.xml order, little-endian hex; ``xx`` for the bytes
    of a register the backend does not report (unavailable in GDB)."""
    out = []
    for r in REGISTERS:
        n = r.bits // 8
        v = values.get(r.name)
        out.append("xx" * n if v is None else (v & ((1 << r.bits) - 1)).to_bytes(n, "little").hex())
    return "".join(out)


def decode_registers(data: str) -> dict[str, int]:
    """The ``G`` payload back into the writable registers' values (the rest are ignored)."""
    out, pos = {}, 0
    for r in REGISTERS:
        n = r.bits // 8
        chunk = data[pos:pos + 2 * n]
        if len(chunk) < 2 * n:
            break
        if r.name in DEBUG_WRITABLE and "x" not in chunk:
            out[r.name] = int.from_bytes(bytes.fromhex(chunk), "little")
        pos += 2 * n
    return out


# -- guest-virtual memory -----------------------------------------------------------------------
def translate(vaddr: int, regs: dict[str, int], read_phys) -> int | None:
    """Guest-physical address of ``vaddr`` through the guest's paging as its CPU would walk it,
    or None when it is not mapped. ``read_phys(gpa, n)`` reads guest RAM (ValueError elsewhere)."""
    cr0, cr4, efer = regs.get("cr0", 0), regs.get("cr4", 0), regs.get("efer", 0)
    if not cr0 & (1 << 31):
        return vaddr
    try:
        if efer & (1 << 10):                    # long mode: 4 levels (5 with LA57)
            levels = 5 if cr4 & (1 << 12) else 4
            table, width, shift = regs.get("cr3", 0) & 0x000FFFFFFFFFF000, 8, 12 + 9 * levels
            for level in range(levels, 0, -1):
                shift -= 9
                entry = struct.unpack("<Q", read_phys(table + ((vaddr >> shift) & 0x1FF) * width, 8))[0]
                if not entry & 1:
                    return None
                if level == 1 or (level <= 3 and entry & 0x80):
                    base = entry & 0x000FFFFFFFFFF000 & ~((1 << shift) - 1)
                    return base | (vaddr & ((1 << shift) - 1))
                table = entry & 0x000FFFFFFFFFF000
        vaddr &= 0xFFFFFFFF
        if cr4 & (1 << 5):                      # PAE: PDPT, PD, PT
            pdpte = struct.unpack("<Q", read_phys((regs.get("cr3", 0) & 0xFFFFFFE0) + (vaddr >> 30) * 8, 8))[0]
            if not pdpte & 1:
                return None
            pde = struct.unpack("<Q", read_phys((pdpte & 0x000FFFFFFFFFF000) + ((vaddr >> 21) & 0x1FF) * 8, 8))[0]
            if not pde & 1:
                return None
            if pde & 0x80:
                return (pde & 0x000FFFFFFFE00000) | (vaddr & 0x1FFFFF)
            pte = struct.unpack("<Q", read_phys((pde & 0x000FFFFFFFFFF000) + ((vaddr >> 12) & 0x1FF) * 8, 8))[0]
            return (pte & 0x000FFFFFFFFFF000) | (vaddr & 0xFFF) if pte & 1 else None
        pde = struct.unpack("<I", read_phys((regs.get("cr3", 0) & 0xFFFFF000) + (vaddr >> 22) * 4, 4))[0]
        if not pde & 1:
            return None
        if pde & 0x80 and cr4 & (1 << 4):       # 4 MiB page (PSE)
            return (pde & 0xFFC00000) | (vaddr & 0x3FFFFF)
        pte = struct.unpack("<I", read_phys((pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4, 4))[0]
        return (pte & 0xFFFFF000) | (vaddr & 0xFFF) if pte & 1 else None
    except ValueError:                          # a table outside guest RAM
        return None


class GuestMemory:
    """Guest RAM by guest-virtual address, for the debugger; a page at a time through ``translate``."""

    def __init__(self, machine, cpu: DebugCpu) -> None:
        self.machine, self.cpu = machine, cpu

    def _pieces(self, vaddr: int, length: int):
        regs = self.cpu.debug_get_regs()
        while length > 0:
            n = min(length, PAGE - (vaddr & (PAGE - 1)))
            yield translate(vaddr, regs, self.machine.read_guest), n
            vaddr, length = vaddr + n, length - n

    def read(self, vaddr: int, length: int) -> bytes:
        """As many bytes as are readable from ``vaddr`` on (GDB accepts a short read), at least one
        or ValueError."""
        out = bytearray()
        for gpa, n in self._pieces(vaddr, length):
            try:
                if gpa is None:
                    raise ValueError("unmapped")
                out += self.machine.read_guest(gpa, n)
            except ValueError:
                if out:
                    break
                raise ValueError(f"{vaddr:#x} is not mapped to guest RAM") from None
        return bytes(out)

    def write(self, vaddr: int, data: bytes) -> None:
        targets = list(self._pieces(vaddr, len(data)))
        if any(gpa is None for gpa, _ in targets):
            raise ValueError(f"[{vaddr:#x}, +{len(data):#x}) is not mapped")
        pos = 0
        for gpa, n in targets:
            self.machine.read_guest(gpa, n)          # all of it RAM before any byte changes
        for gpa, n in targets:
            self.machine.write_guest(gpa, data[pos:pos + n])
            pos += n
        self.cpu.debug_memory_written()

    def physical(self, vaddr: int) -> int | None:
        gpa = translate(vaddr, self.cpu.debug_get_regs(), self.machine.read_guest)
        try:
            if gpa is not None:
                self.machine.read_guest(gpa, 1)
        except ValueError:
            return None
        return gpa


# -- the wire -------------------------------------------------------------------------------------
def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to loopback (QEMU's -s takes every
    interface; a debug port that controls the guest stays local unless asked)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise GdbError(f"--gdb {text!r}: give [HOST:]PORT with a port from 0 to 65535")
    return host, int(port)


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(payload: str | bytes) -> bytes:
    """``$payload#cs`` with the characters the protocol reserves escaped."""
    data = payload.encode("latin-1") if isinstance(payload, str) else payload
    data = bytes(b for c in data for b in ((0x7D, c ^ 0x20) if c in b"$#}*" else (c,)))
    return b"$" + data + b"#" + f"{checksum(data):02x}".encode()


def unescape(data: bytes) -> bytes:
    out, it = bytearray(), iter(data)
    for c in it:
        out.append(next(it, 0) ^ 0x20 if c == 0x7D else c)
    return bytes(out)


class Connection:
    """One client: a reader thread turns the byte stream into packets (a queue), acks them, and
    hands Ctrl-C to ``on_interrupt`` at once (the guest may be running)."""

    def __init__(self, sock: socket.socket, on_interrupt) -> None:
        self.sock = sock
        self.packets: queue.Queue[bytes | None] = queue.Queue()      # None: the client went
        self.ack = True
        self.closed = False
        self._send_lock = threading.Lock()
        self._last = b""
        self._on_interrupt = on_interrupt
        self._skipping = False              # inside a packet too long to take
        threading.Thread(target=self._reader, name="gdb-reader", daemon=True).start()

    def send(self, payload: str | bytes) -> None:
        data = frame(payload)
        with self._send_lock:
            self._last = data
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _reader(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                buf = self._consume(buf + chunk)
        except OSError:
            pass
        self.closed = True
        self.packets.put(None)
        self._on_interrupt()          # a running guest returns to the stub, which detaches

    def _consume(self, buf: bytes) -> bytes:
        """Take every whole packet and control byte off ``buf``; returns what is left (at most one
        packet's worth: a longer one is refused with a NAK and skipped up to its ``#``)."""
        pos = 0
        while pos < len(buf):
            if self._skipping:
                end = buf.find(b"#", pos)
                if end < 0:
                    return b""
                self._skipping, pos = False, end + 1     # its checksum digits go as line noise
                continue
            c = buf[pos]
            if c == 0x03:
                self._on_interrupt()
                pos += 1
            elif c == ord("$"):
                end = buf.find(b"#", pos, pos + PACKET_MAX + 2)
                if end < 0:
                    if len(buf) - pos > PACKET_MAX + 1:  # no end in sight: refuse it
                        self._raw(b"-")
                        self._skipping, pos = True, pos + 1
                        continue
                    return buf[pos:]
                if len(buf) < end + 3:
                    return buf[pos:]
                data, cs, pos = buf[pos + 1:end], buf[end + 1:end + 3], end + 3
                try:
                    good = int(cs, 16) == checksum(data)
                except ValueError:
                    good = False
                if self.ack:
                    self._raw(b"+" if good else b"-")
                if good or not self.ack:
                    self.packets.put(data)
            elif c == ord("-"):
                with self._send_lock:
                    last = self._last
                self._raw(last)
                pos += 1
            else:                   # '+' and line noise
                pos += 1
        return b""

    def _raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True


# -- the stub -------------------------------------------------------------------------------------
class GdbServer:
    """The listening socket (made before the machine, so a busy port is a one-line usage error)
    and the stub that serves one run with it."""

    def __init__(self, address: str, wait: bool = False) -> None:
        host, port = parse_address(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            self.listener = socket.socket(family, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(sockaddr)
            self.listener.listen(1)
        except OSError as e:
            raise GdbError(f"--gdb {address}: cannot listen: {e.strerror or e}") from None
        self.wait = wait
        self.host, self.port = self.listener.getsockname()[:2]

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes the thread blocked in accept()
        except OSError:
            pass
        self.listener.close()

    def serve(self, cpu: DebugCpu, machine, entry: int, start_info: int, timeout: float) -> RunResult:
        """Run the guest under the stub; returns how the run ended."""
        try:
            return GdbStub(self, cpu, machine, timeout).run(entry, start_info)
        finally:
            self.close()


class GdbStub:
    def __init__(self, server: GdbServer, cpu: DebugCpu, machine, timeout: float) -> None:
        self.server, self.cpu, self.machine = server, cpu, machine
        self.mem = GuestMemory(machine, cpu)
        self.timeout = timeout
        self.budget = timeout               # guest running time left (0: no limit)
        self.unlimited = not timeout
        self.conn: Connection | None = None
        self._incoming: queue.Queue[socket.socket] = queue.Queue()
        self.breakpoints: set[int] = set()
        self.hw: set[int] = set()
        self.stop_signal = SIGTRAP
        self.stop_reply = ""
        self.final: RunResult | None = None     # the run ended, held for the debugger to look at
        self._lock = threading.Lock()
        self._done = False                      # the run is over: the CPU may be gone

    def _interrupt(self) -> None:
        """Stop the running guest (from a socket thread), unless the run is already over."""
        with self._lock:
            if not self._done:
                self.cpu.debug_interrupt()

    # -- connections ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """Later clients (no --gdb-wait, or after a detach): each stops the guest where it is."""
        while True:
            try:
                sock, _ = self.server.listener.accept()
            except OSError:
                return                          # the listener closed: the run is over
            if self.conn is not None and not self.conn.closed:
                sock.close()                    # one client at a time
                continue
            self._incoming.put(sock)
            self._interrupt()

    def _take_connection(self) -> bool:
        try:
            sock = self._incoming.get_nowait()
        except queue.Empty:
            return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(sock, self._interrupt)
        log.info("gdb: client attached")
        return True

    def _detach(self, why: str) -> None:
        self.breakpoints.clear()
        self.hw.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        log.info("gdb: %s; the guest runs on", why)

    # -- running ----------------------------------------------------------------------------------
    def run(self, entry: int, start_info: int) -> RunResult:
        self.cpu.debug_begin(entry, start_info)
        where = f"{self.server.host}:{self.server.port}"
        if self.server.wait:
            log.info("gdb: waiting for a client on %s (target remote %s), guest stopped at its entry %#x",
                     where, where, entry)
            sock, _ = self.server.listener.accept()
            self._incoming.put(sock)
            self._take_connection()
            self._set_stop(DebugStop("breakpoint"))
        else:
            log.info("gdb: listening on %s (target remote %s)", where, where)
        threading.Thread(target=self._accept_loop, name="gdb-accept", daemon=True).start()
        try:
            return self._main()
        finally:
            with self._lock:
                self._done = True
            if self.conn is not None:
                self.conn.close()

    def _main(self) -> RunResult:
        while True:
            if self.conn is None:               # nobody attached: the guest runs freely
                outcome = self._resume(False)
                if isinstance(outcome, RunResult):
                    return self._ended(outcome)
                if self._take_connection():
                    self._set_stop(DebugStop("interrupt"))
                continue
            action = self._serve_packets()
            if isinstance(action, RunResult):
                return action
            if action == "detach":
                continue
            outcome = self._resume(action == "step")
            if isinstance(outcome, RunResult):
                ended = self._ended(outcome)
                if ended is not None:
                    return ended
                continue
            if self.conn is not None and self.conn.closed:
                self._detach("client went away")
                continue
            self._set_stop(outcome)
            if self.conn is not None:
                self.conn.send(self.stop_reply)

    def _resume(self, step: bool) -> RunResult | DebugStop:
        """One resume with the budget left; a breakpoint at the resume address is stepped off first."""
        rip = self.cpu.debug_get_regs()["rip"]
        t = time.monotonic()
        try:
            if not step and (rip in self.breakpoints or rip in self.hw):
                first = self.cpu.debug_resume(True, self._planted(rip), frozenset(self.hw - {rip}), self._left())
                if not (isinstance(first, DebugStop) and first.kind == "step"):
                    return first
            return self.cpu.debug_resume(step, self._planted(rip if step else None), frozenset(self.hw),
                                         self._left())
        finally:
            self.budget -= time.monotonic() - t

    def _left(self) -> float:
        return 0.0 if self.unlimited else max(self.budget, 1e-3)

    def _planted(self, skip: int | None) -> dict[int, int | None]:
        return {a: self.mem.physical(a) for a in self.breakpoints if a != skip}

    def _ended(self, result: RunResult) -> RunResult | None:
        """The guest ended: an exit goes to GDB as W and ends the run; anything else is held as a
        stop so its registers can be looked at (None: keep serving)."""
        if result.reason == "timeout" and not self.unlimited:
            result = RunResult(result.status, result.reason, result.backend,
                               f"guest ran {self.timeout:g} s under the debugger (--timeout counts running "
                               f"time only); stopped ({self.cpu.describe_cpu()})")
        if self.conn is None:
            return result
        if result.reason == "exit":
            self.conn.send(f"W{result.status & 0xFF:02x}")
            return result
        self.final = result
        self.stop_signal = END_SIGNALS.get(result.reason, SIGSEGV)
        self.stop_reply = f"T{self.stop_signal:02x}thread:01;"
        self.conn.send(b"O" + f"vmm: {result.message}\n".encode().hex().encode())
        self.conn.send(self.stop_reply)
        return None

    def _set_stop(self, stop: DebugStop) -> None:
        self.stop_signal = SIGINT if stop.kind == "interrupt" else SIGTRAP
        extra = "swbreak:;" if stop.kind == "breakpoint" and stop.address in self.breakpoints else (
            "hwbreak:;" if stop.kind == "breakpoint" and stop.address in self.hw else "")
        self.stop_reply = f"T{self.stop_signal:02x}thread:01;{extra}"

    # -- packets ----------------------------------------------------------------------------------
    def _serve_packets(self) -> str | RunResult:
        """Answer packets until one resumes the guest ("continue", "step"), detaches ("detach") or
        ends the run (the RunResult)."""
        conn = self.conn
        while True:
            data = conn.packets.get()
            if data is None:
                if self.final is not None:
                    return self.final
                self._detach("client went away")
                return "detach"
            try:
                reply = self._handle(data)
            except (ValueError, IndexError, KeyError, OverflowError):
                reply = "E01"
            except Exception as e:      # noqa: BLE001 - a backend refusing one request must not end the run
                log.debug("gdb: %r failed: %s", data[:40], e)
                reply = "E01"
            if isinstance(reply, RunResult):
                return reply
            if reply in ("continue", "step"):
                if self.final is not None:      # the guest already ended: now the run does
                    conn.send(f"X{self.stop_signal:02x}")
                    return self.final
                return reply
            if reply == "detach":
                conn.send("OK")
                if self.final is not None:
                    return self.final
                self._detach("client detached")
                return "detach"
            conn.send(reply)
            if data == b"QStartNoAckMode":
                conn.ack = False

    def _handle(self, data: bytes) -> str | bytes | RunResult:
        """One packet's reply (str/bytes), or the action it asks for."""
        text = data.decode("latin-1")
        cmd, rest = text[:1], text[1:]
        if cmd == "?":
            return self.stop_reply
        if cmd == "g":
            return encode_registers(self.cpu.debug_get_regs())
        if cmd == "G":
            self.cpu.debug_set_regs(decode_registers(rest))
            return "OK"
        if cmd == "p":
            return self._one_register(REGISTERS[int(rest, 16)], self.cpu.debug_get_regs())
        if cmd == "P":
            num, _, value = rest.partition("=")
            reg = REGISTERS[int(num, 16)]
            if reg.name not in DEBUG_WRITABLE:
                return "E01"
            self.cpu.debug_set_regs({reg.name: int.from_bytes(bytes.fromhex(value), "little")})
            return "OK"
        if cmd == "m":
            addr, length = (int(x, 16) for x in rest.split(","))
            try:
                return self.mem.read(addr, min(length, PACKET_MAX // 2 - 16)).hex()
            except ValueError:
                return "E14"
        if cmd in "MX" and cmd:
            head, _, payload = data[1:].partition(b":")
            addr, length = (int(x, 16) for x in head.decode().split(","))
            blob = bytes.fromhex(payload.decode()) if cmd == "M" else unescape(payload)
            if len(blob) != length:
                return "E01"
            if length:
                try:
                    self.mem.write(addr, blob)
                except ValueError:
                    return "E14"
            return "OK"
        if cmd in "Zz" and cmd:
            return self._breakpoint(cmd == "Z", rest)
        if cmd in "cCsS" and cmd:
            self._resume_at(rest.split(";", 1)[1] if cmd in "CS" and ";" in rest else
                            ("" if cmd in "CS" else rest))
            return "step" if cmd in "sS" else "continue"
        if cmd == "D":
            return "detach"
        if cmd == "k":
            return RunResult(EXIT_KILLED, "killed", self.cpu.name, "killed from the debugger")
        if cmd == "H" or cmd == "T":
            return "OK"
        if text.startswith("vCont"):
            return self._vcont(text)
        if text.startswith("qSupported"):
            return (f"PacketSize={PACKET_MAX:x};qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;"
                    "vContSupported+")
        if text.startswith("qXfer:features:read:"):
            return self._xfer(text[len("qXfer:features:read:"):])
        if text == "QStartNoAckMode":
            return "OK"
        if text == "qAttached":
            return "1"
        if text == "qC":
            return "QC01"
        if text == "qfThreadInfo":
            return "m01"
        if text == "qsThreadInfo":
            return "l"
        if text.startswith("qSymbol"):
            return "OK"
        return ""                   # not supported: the empty reply, as the protocol asks

    def _one_register(self, reg: Reg, values: dict[str, int]) -> str:
        v, n = values.get(reg.name), reg.bits // 8
        return "xx" * n if v is None else (v & ((1 << reg.bits) - 1)).to_bytes(n, "little").hex()

    def _resume_at(self, addr: str) -> None:
        if addr:
            self.cpu.debug_set_regs({"rip": int(addr, 16)})

    def _vcont(self, text: str) -> str:
        if text == "vCont?":
            return "vCont;c;C;s;S"
        actions = text[len("vCont;"):].split(";") if text.startswith("vCont;") else []
        if not actions:
            raise ValueError(text)
        # One thread: the first action applies (a thread-specific one, or the default).
        kind = actions[0].split(":")[0][:1]
        if kind in ("c", "C"):
            return "continue"
        if kind in ("s", "S"):
            return "step"
        raise ValueError(text)

    def _breakpoint(self, insert: bool, rest: str) -> str:
        kind, addr_text, _ = (rest.split(",") + ["", ""])[:3]
        addr = int(addr_text, 16)
        if kind == "0":
            if insert:
                self.breakpoints.add(addr)
            else:
                self.breakpoints.discard(addr)
            return "OK"
        if kind == "1":
            if insert:
                if addr not in self.hw and len(self.hw) >= HW_BREAKPOINTS:
                    return "E01"
                self.hw.add(addr)
            else:
                self.hw.discard(addr)
            return "OK"
        return ""                   # watchpoints: not supported

    def _xfer(self, args: str) -> str | bytes:
        annex, _, span = args.partition(":")
        if annex != "target.xml":
            return "E00"
        offset, length = (int(x, 16) for x in span.split(","))
        chunk = TARGET_XML[offset:offset + min(length, PACKET_MAX - 16)]
        more = offset + len(chunk) < len(TARGET_XML)
        return (b"m" if more else b"l") + chunk
