"""Boot the guest payloads in QEMU, independently of our own VMM.

This checks the payloads themselves (PVH note, start code, console, debug
exit) against a reference loader: QEMU's `-kernel` PVH path.  QEMU's
isa-debug-exit turns a guest status V into the process status (V << 1) | 1.

The ELF checks need only gcc/make; the boots also need qemu-system-x86_64
(Debian: `apt-get install qemu-system-x86`).
"""

import fcntl
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "guest_images"
QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 60  # seconds; TCG boots these in well under one


def guest_elf(name: str) -> Path:
    """Path of guest_images/out/<name>.elf, (re)built with make when possible.

    make is incremental, so this is cheap when the ELF is current.  Only the
    one target is built, so a broken payload elsewhere cannot fail this test.
    """
    elf = GUEST / "out" / f"{name}.elf"
    if shutil.which("make") and shutil.which("gcc"):
        (GUEST / "out").mkdir(exist_ok=True)
        # Serialise builds (pytest-xdist workers share the tree).
        with open(GUEST / "out" / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            proc = subprocess.run(
                ["make", "-C", str(GUEST), f"out/{name}.elf"],
                capture_output=True, text=True,
            )
        assert proc.returncode == 0, f"building {name}.elf failed:\n{proc.stdout}{proc.stderr}"
    elif not elf.exists():
        pytest.skip(f"{elf} is not built and gcc/make are not available to build it")
    return elf


def boot(elf: Path, accel: str = "tcg") -> subprocess.CompletedProcess:
    """Run one payload under QEMU microvm; the debug console goes to stdout."""
    cmd = [
        QEMU, "-M", "microvm", "-accel", accel, "-m", "256M",
        "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
        "-no-reboot",
        "-debugcon", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", str(elf),
    ]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=BOOT_TIMEOUT)


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


# ---------------------------------------------------------------------------
# The ELF itself: what every PVH loader (QEMU, Firecracker, our VMM) needs.

PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_entry(data: bytes) -> int | None:
    """The PHYS32_ENTRY address from the PT_NOTE segments, or None."""
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type != PT_NOTE:
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            name = data[off + 12:off + 12 + namesz]
            desc_off = off + 12 + (namesz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return struct.unpack_from("<I", data, desc_off)[0]
            off = desc_off + (descsz + 3) // 4 * 4
    return None


@pytest.mark.parametrize("name", ["hello", "demo"])
def test_elf_is_a_pvh_payload(name):
    data = guest_elf(name).read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2, "ELF64 (linux-loader accepts nothing else)"
    e_machine, = struct.unpack_from("<H", data, 0x12)
    assert e_machine == 62, "EM_X86_64"
    e_entry, = struct.unpack_from("<Q", data, 0x18)
    assert e_entry >= 0x100000

    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    loads = []
    for i in range(e_phnum):
        p_type, _, _, _, p_paddr, _ = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD:
            loads.append(p_paddr)
    assert loads and min(loads) >= 0x100000, f"PT_LOADs below 1 MiB: {loads}"

    entry = pvh_entry(data)
    assert entry is not None, "no Xen PHYS32_ENTRY note in a PT_NOTE segment"
    assert entry == e_entry
    # QEMU tries Multiboot before PVH and rejects an x86-64 ELF carrying a
    # Multiboot 1 header (magic in the first 8 KiB), so there must be none.
    assert struct.pack("<I", 0x1BADB002) not in data[:8192]


# ---------------------------------------------------------------------------
# Boots.

needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed "
                                "(Debian: apt-get install qemu-system-x86)")

ACCELS = [
    "tcg",
    pytest.param("kvm", marks=pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm not usable")),
]


@needs_qemu
@pytest.mark.parametrize("accel", ACCELS)
@pytest.mark.parametrize("name, status, text", [
    ("hello", 0, "Hello from iommu-lab"),
    ("exitcode", 42, "exiting with status 42"),
])
def test_boot_prints_and_exits(name, status, text, accel):
    proc = boot(guest_elf(name), accel)
    out = proc.stdout.decode(errors="replace")
    assert text in out, f"console:\n{out}\nstderr:\n{proc.stderr.decode(errors='replace')}"
    assert proc.returncode == (status << 1) | 1, out


@needs_qemu
def test_boot_hello_sees_start_info():
    out = boot(guest_elf("hello")).stdout.decode(errors="replace")
    assert "magic 0x336ec578 version 1" in out, out


@needs_qemu
def test_boot_triple_fault_shuts_down():
    # Under -no-reboot a CPU shutdown makes QEMU exit 0 (not via debug exit).
    proc = boot(guest_elf("triple"))
    assert b"about to triple-fault" in proc.stdout
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")
