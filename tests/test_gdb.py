"""The GDB stub (vmm/gdbstub.py): a stock ``gdb -batch`` attached to ``vmm run --gdb --gdb-wait`` on
both backends, and a raw protocol client for what gdb -batch cannot do (Ctrl-C, a lost connection,
malformed packets, detach, kill)."""
from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmm.backends.kvm_debug import kvm_debug_usable
from vmm.gdbstub import GdbError, checksum, decode_registers, encode_registers, parse_address, translate

REPO = Path(__file__).resolve().parents[1]
ELF = REPO / "guest_images" / "out"
GDB = shutil.which("gdb")
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (Debian: apt-get install gdb)")
KVM_DEBUG_OK, KVM_DEBUG_WHY = kvm_debug_usable()
DEBUG_BACKENDS = [pytest.param("kvm", marks=pytest.mark.skipif(
    not KVM_DEBUG_OK, reason=f"KVM cannot debug guests here: {KVM_DEBUG_WHY}")), "emulated"]


class Vmm:
    """``vmm run IMAGE --gdb 127.0.0.1:0 --gdb-wait`` in a subprocess; ``port`` is the one it took."""

    def __init__(self, backend: str, image: str, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vmm", "run", image, "--backend", backend,
                                      "--gdb", "127.0.0.1:0", *extra], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        found = threading.Event()
        self.port = 0

        def drain() -> None:
            for line in self.proc.stderr:
                self.err.append(line)
                m = re.search(r"gdb: (?:waiting for a client|listening) on 127\.0\.0\.1:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    found.set()
            found.set()
        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()
        found.wait(60)
        assert self.port, "".join(self.err)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        try:
            out = self.proc.stdout.read()
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        return rc, out, "".join(self.err)


def gdb(port: int, image: str, commands: list[str]) -> str:
    script = ["set pagination off", "set confirm off", f"target remote 127.0.0.1:{port}", *commands]
    args = [GDB, "-batch", "-nx", str(ELF / f"{image}.elf")]
    for c in script:
        args += ["-ex", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


@needs_gdb
@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_gdb_breaks_reads_steps_and_continues_to_exit(backend):
    vmm = Vmm(backend, "demo", "--gdb-wait")
    out = gdb(vmm.port, "demo", [
        "info registers rip cs eflags",         # the PVH entry: 32-bit protected mode, paging off
        "print/x $cr0", "print/x $efer",
        "break check", "continue",
        "print nr_checks", "print ok", "print/x $cr0",
        "next", "next", "print nr_checks",
        "stepi", "print $pc",
        "set var nr_checks = 100",              # a write through the guest's page tables
        "delete", "continue"])
    rc, stdout, err = vmm.finish()
    assert re.search(r"rip\s+0x100000\s+0x100000 <_start32>", out), out
    assert "$1 = 0x11" in out and "$2 = 0x0" in out, out            # CR0 = PE|ET, EFER = 0
    assert "Breakpoint 1, check (ok=" in out, out
    assert "$3 = 0" in out and "$4 = 1" in out, out                  # nr_checks before, the argument
    assert "$5 = 0x80000011" in out, out                             # paging on by then (long mode)
    assert "$6 = 1" in out, out                                      # `next` ran nr_checks++
    assert re.search(r"\$7 = \(void \(\*\)\(\)\) 0x10[0-9a-f]+ <check\+\d+>", out), out
    assert "[Inferior 1 (Remote target) exited normally]" in out, out
    assert rc == 0, err
    plain = subprocess.run([sys.executable, "-m", "vmm", "run", "demo", "--backend", "emulated"],
                           capture_output=True, text=True, timeout=120).stdout
    total = int(re.search(r"done: (\d+) checks", plain).group(1))
    assert f"done: {100 + total - 1} checks, 0 failures" in stdout, stdout   # 100 + the checks after the first


@needs_gdb
@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_gdb_steps_across_the_switch_to_long_mode(backend):
    """From the 32-bit entry into 64-bit code, one instruction at a time: `mov %eax,%cr0` (3 bytes)
    turns paging and long mode on, the `ljmp` (7 bytes) lands on _start64 in a 64-bit CS."""
    vmm = Vmm(backend, "hello", "--gdb-wait")
    out = gdb(vmm.port, "hello", [
        "break *(_start64 - 10)", "continue",
        "print/x $cr0", "print/x $efer",
        "stepi", "print/x $cr0", "print/x $efer", "print $pc == _start64 - 7",
        "stepi", "print $pc == _start64", "stepi", "print/x $eax",
        "continue"])
    rc, stdout, err = vmm.finish()
    assert "$1 = 0x11" in out and "$2 = 0x100" in out, out                # LME set, paging off
    assert "$3 = 0x80000011" in out and "$4 = 0x500" in out and "$5 = 1" in out, out   # LMA now
    assert "$6 = 1" in out and "$7 = 0x10" in out, out                  # _start64's first mov ran
    assert rc == 0 and "Hello from iommu-lab" in stdout, err


@needs_gdb
@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_gdb_register_write_changes_the_exit_status(backend):
    vmm = Vmm(backend, "exitcode", "--gdb-wait")
    out = gdb(vmm.port, "exitcode", ["break exit", "continue", "print $rdi", "set var $rdi = 7", "continue"])
    rc, _, err = vmm.finish()
    assert "$1 = 42" in out and "exited with code 07" in out, out
    assert rc == 7, err


# -- a raw client --------------------------------------------------------------------------------
class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # as gdb does
        self.buf = b""

    def send(self, payload: bytes) -> None:
        self.sock.sendall(b"$" + payload + b"#%02x" % checksum(payload))

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def fill_until(self, marker: bytes) -> None:
        while marker not in self.buf:
            self._fill()
        self.buf = self.buf.replace(marker, b"", 1)

    def reply(self) -> bytes:
        while True:
            self.buf = self.buf.lstrip(b"+-")
            m = re.match(rb"\$([^#]*)#([0-9a-f]{2})", self.buf)
            if m:
                self.buf = self.buf[m.end():]
                self.sock.sendall(b"+")
                assert int(m.group(2), 16) == checksum(m.group(1))
                return m.group(1)
            self._fill()

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def regs(self) -> dict[str, int]:
        raw = self.ask(b"g").decode()
        return {k: v for k, v in decode_registers(raw).items()}


@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_protocol_errors_ctrl_c_and_a_lost_connection(backend):
    """Bad packets get E01 or the empty reply, Ctrl-C stops a spinning guest, and when the client
    goes away the guest runs on (here until --timeout, which counts only its running time)."""
    vmm = Vmm(backend, "spin", "--gdb-wait", "--timeout", "1.5")
    c = Client(vmm.port)
    assert c.ask(b"?").startswith(b"T05")
    assert b"qXfer:features:read+" in c.ask(b"qSupported:multiprocess+;swbreak+")
    xml = c.ask(b"qXfer:features:read:target.xml:0,3fff")
    assert xml.startswith(b"l") and b"i386:x86-64" in xml
    assert c.ask(b"m100000,zz") == b"E01"                 # not hex
    assert c.ask(b"mfffffff000000000,4") == b"E14"        # nowhere in guest RAM
    assert c.ask(b"p9999") == b"E01"                      # no such register
    assert c.ask(b"Z0,notanaddress,1") == b"E01"
    assert c.ask(b"P39=0000000000000000") == b"E01"       # fs_base: read-only
    assert c.ask(b"vMustReplyEmpty") == b""
    assert c.ask(b"qAttached") == b"1" and c.ask(b"qC") == b"QC01" and c.ask(b"qfThreadInfo") == b"m01"
    c.sock.sendall(b"$m100000,4#00")                      # bad checksum: a NAK, then business as usual
    assert c.ask(b"m100000,1") == b"fa"                   # `cli` at the PVH entry
    assert c.ask(b"vCont?") == b"vCont;c;C;s;S"
    assert c.ask(b"vCont;s:1;c").startswith(b"T05")       # one instruction
    assert c.regs()["rip"] == 0x100001
    c.send(b"c")
    time.sleep(0.5)                                       # into the spin loop
    c.sock.sendall(b"\x03")
    assert c.reply().startswith(b"T02")                   # SIGINT: stopped in the spin loop
    spin_rip = c.regs()["rip"]
    assert 0x101000 <= spin_rip < 0x104000
    c.send(b"c")
    c.sock.close()                                        # gone while the guest runs
    rc, stdout, err = vmm.finish()
    assert rc == 124 and "client went away" in err and "Traceback" not in err, err
    assert "spinning" in stdout


@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_detach_lets_the_guest_finish_and_kill_ends_the_run(backend):
    vmm = Vmm(backend, "hello", "--gdb-wait")
    c = Client(vmm.port)
    assert c.ask(b"D") == b"OK"
    rc, stdout, err = vmm.finish()
    assert rc == 0 and "Hello from iommu-lab" in stdout, err
    vmm = Vmm(backend, "spin", "--gdb-wait", "--timeout", "0")
    c = Client(vmm.port)
    c.send(b"c")
    c.sock.sendall(b"\x03")
    assert c.reply().startswith(b"T02")
    c.send(b"k")
    rc, _, err = vmm.finish()
    assert rc == 130 and "killed from the debugger" in err, err


def symbol(image: str, name: str) -> int:
    from elftools.elf.elffile import ELFFile
    with open(ELF / f"{image}.elf", "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_hardware_and_aliased_software_breakpoints(backend):
    """A software breakpoint stops at main without leaving its int3 for GDB to see, a hardware one
    at puts; four hardware breakpoints at most, no watchpoints."""
    puts, main = symbol("hello", "puts"), symbol("hello", "main")
    vmm = Vmm(backend, "hello", "--gdb-wait")
    c = Client(vmm.port)
    before = c.ask(b"m%x,10" % main)
    assert c.ask(b"Z1,%x,1" % puts) == b"OK"
    assert c.ask(b"Z0,%x,1" % main) == b"OK"
    assert c.ask(b"c") == b"T05thread:01;swbreak:;"
    assert c.regs()["rip"] == main
    assert c.ask(b"m%x,10" % main) == before             # no int3 left behind while stopped
    assert c.ask(b"c") == b"T05thread:01;hwbreak:;"
    assert c.regs()["rip"] == puts
    assert c.ask(b"z1,%x,1" % puts) == b"OK" and c.ask(b"z0,%x,1" % main) == b"OK"
    assert all(c.ask(b"Z1,%x,1" % (puts + i)) == b"OK" for i in range(4))
    assert c.ask(b"Z1,%x,1" % (puts + 4)) == b"E01"      # four debug address registers
    assert c.ask(b"Z2,%x,4" % puts) == b""               # watchpoints: not supported
    assert c.ask(b"D") == b"OK"
    rc, stdout, err = vmm.finish()
    assert rc == 0 and "Hello from iommu-lab" in stdout, err


def test_random_packets_never_end_the_run():
    """Garbage in every packet that does not resume or end the guest: each gets a reply, and
    the stub still answers afterwards."""
    import random
    rng = random.Random(14)
    alphabet = b"0123456789abcdefxXgGpPmMzZqQH?T,:;=#$}*-\x03"
    vmm = Vmm("emulated", "hello", "--gdb-wait")
    c = Client(vmm.port)
    for _ in range(400):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))
        body = body.replace(b"$", b"").replace(b"#", b"").replace(b"\x03", b"")
        if not body or body[:1] in b"cCsSkDv" or body.startswith(b"QStartNoAck"):
            continue
        escaped = body.replace(b"}", b"}]").replace(b"*", b"}\n")
        c.send(escaped)
        c.reply()
    c.sock.sendall(b"$m" + b"0" * (3 * 0x4000) + b"#00")  # far past PacketSize: dropped with a NAK
    c.fill_until(b"-")
    assert c.ask(b"?").startswith(b"T")
    c.send(b"k")
    rc, _, err = vmm.finish()
    assert rc == 130 and "Traceback" not in err, err


@pytest.mark.parametrize("backend", DEBUG_BACKENDS)
def test_a_crash_stops_with_sigsegv_then_ends_the_run(backend):
    vmm = Vmm(backend, "triple", "--gdb-wait")
    c = Client(vmm.port)
    c.send(b"c")
    reply = c.reply()
    while reply.startswith(b"O"):                         # the reason, as a console line
        reply = c.reply()
    assert reply.startswith(b"T0b"), reply
    assert c.regs()["rip"] > 0x100000
    assert c.ask(b"c") == b"X0b"
    rc, _, err = vmm.finish()
    assert rc == 126 and "triple-fault" in err, err


def test_attach_without_wait_stops_a_running_guest():
    vmm = Vmm("emulated", "spin", "--timeout", "0")
    assert vmm.proc.stdout.readline() == "spinning\n"     # running before anyone attached
    c = Client(vmm.port)
    assert c.ask(b"?").startswith(b"T02")
    assert 0x101000 <= c.regs()["rip"] < 0x104000
    c.send(b"k")
    rc, _, err = vmm.finish()
    assert rc == 130 and "gdb: client attached" in err


# -- pieces -------------------------------------------------------------------------------------
def test_registers_round_trip_and_unavailable_ones():
    regs = {"rax": 0x1122334455667788, "rip": 0x100000, "eflags": 0x202, "cs": 8, "cr3": 0x103000}
    text = encode_registers(regs)
    assert text.startswith("8877665544332211")
    assert "xx" * 10 in text                         # st0: not reported, unavailable to GDB
    back = decode_registers(text)
    assert back["rax"] == regs["rax"] and back["rip"] == 0x100000 and back["eflags"] == 0x202
    assert "cs" not in back and "cr3" not in back    # read-only: never written back


def test_translate_walks_each_paging_mode():
    mem: dict[int, bytes] = {}

    def put(addr: int, value: int, width: int = 8) -> None:
        mem[addr] = value.to_bytes(width, "little")

    def read(addr: int, n: int) -> bytes:
        if addr not in mem:
            raise ValueError("not RAM")
        return mem[addr][:n]
    # long mode: PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> 2 MiB page at 0x40000000 and a PT
    put(0x1000 + 8 * 1, 0x2003)                      # vaddr bits 47:39 = 1
    put(0x2000 + 8 * 0, 0x3003)
    put(0x3000 + 8 * 0, 0x40000083)                  # 2 MiB page
    put(0x3000 + 8 * 1, 0x4003)                      # PT
    put(0x4000 + 8 * 5, 0x7000003)
    lm = {"cr0": 0x80000011, "cr3": 0x1000, "cr4": 0x20, "efer": 0x500}
    assert translate((1 << 39) + 0x12345, lm, read) == 0x40012345
    assert translate((1 << 39) + 0x200000 + 5 * 0x1000 + 0x10, lm, read) == 0x7000010
    assert translate(0x12345, lm, read) is None                  # PML4[0] not present
    assert translate(0x1234, {"cr0": 0x11}, read) == 0x1234      # paging off: identity
    # 32-bit, no PAE: PD at 0x8000, a 4 MiB page (PSE) and a 4 KiB one
    put(0x8000 + 4 * 1, 0x00C00083, 4)
    put(0x8000 + 4 * 2, 0x9003, 4)
    put(0x9000 + 4 * 3, 0x5000003, 4)
    legacy = {"cr0": 0x80000011, "cr3": 0x8000, "cr4": 0x10, "efer": 0}
    assert translate(0x400000 + 0x1234, legacy, read) == 0xC01234
    assert translate(0x800000 + 3 * 0x1000 + 7, legacy, read) == 0x5000007
    # PAE: PDPT at 0xA000 -> PD 0xB000 -> 2 MiB page
    put(0xA000 + 8 * 0, 0xB001)
    put(0xB000 + 8 * 2, 0x600083)
    pae = {"cr0": 0x80000011, "cr3": 0xA000, "cr4": 0x20, "efer": 0}
    assert translate(2 * 0x200000 + 0x99, pae, read) == 0x600099


@pytest.mark.parametrize("text, want", [("1234", ("127.0.0.1", 1234)), (":0", ("127.0.0.1", 0)),
                                        ("0.0.0.0:5", ("0.0.0.0", 5)), ("[::1]:7", ("::1", 7))])
def test_gdb_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "host:", "70000", "a:b"])
def test_bad_gdb_address_is_one_line(text):
    with pytest.raises(GdbError, match="give \\[HOST:\\]PORT"):
        parse_address(text)


def test_cli_refuses_a_busy_port_and_a_lone_gdb_wait(capsys):
    from vmm import cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert cli.main(["run", "hello", "--backend", "emulated", "--gdb", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vmm: --gdb 127.0.0.1:{port}: cannot listen: Address already in use"]
    assert cli.main(["run", "hello", "--backend", "emulated", "--gdb-wait"]) == 2
    assert "--gdb-wait needs --gdb" in capsys.readouterr().err


def test_guest_memory_reads_stop_at_the_end_of_ram():
    """A read running off guest RAM returns what it could (GDB accepts a short read)."""
    from vmm.backends.emulated import EmulatedBackend
    from vmm.gdbstub import GuestMemory
    from vmm.machine import Machine
    with Machine.from_board("rcar-virt", quiet=True) as m:
        cpu = EmulatedBackend(m)
        try:
            end = max(start + size for start, size in m.dom0.ram_ranges)
            m.write_guest(end - 4, struct.pack("<I", 0xDEADBEEF))
            mem = GuestMemory(m, cpu)
            assert mem.read(end - 4, 64) == struct.pack("<I", 0xDEADBEEF)
            with pytest.raises(ValueError):
                mem.read(end, 4)
            with pytest.raises(ValueError):
                mem.write(end - 2, b"abcd")
            assert m.read_guest(end - 4, 4) == struct.pack("<I", 0xDEADBEEF)    # nothing half-written
        finally:
            cpu.close()
