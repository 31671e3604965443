"""bzImages boot like the ELF inside them; --cmdline and --initrd reach hvm_start_info.

The bzImages here are synthetic: a payload ELF compressed behind a hand-made setup header, laid
out as the kernel build lays out arch/x86/boot/bzImage (setup sectors, then the protected-mode
part holding the compressed vmlinux at payload_offset, with the size trailer the build appends).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from support import BACKENDS

from vmm import Machine
from vmm.bzimage import MAX_VMLINUX, BzImageError, decompress
from vmm.elfload import CMDLINE_ADDR, MODLIST_ADDR, START_INFO_ADDR, ImageError, load_image
from vmm.images import find_image
from vmm.machine import ram_ranges

HELLO = Path(find_image("hello"))
RAM = ram_ranges(128 << 20)
SETUP_SECTS = 3
PAYLOAD_OFFSET = 0x1C0


def lz4_legacy(data: bytes) -> bytes:
    import lz4.block
    out = struct.pack("<I", 0x184C2102)
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "bzip2": bz2.compress,
    "lz4": lz4_legacy,
    "zstd": zstd,
}


def bzimage(payload: bytes, version: int = 0x020F, length: int | None = None) -> bytes:
    """Setup sectors with the header fields the loader reads, then the protected-mode part."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    setup[0x1FE:0x200] = b"\x55\xAA"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, PAYLOAD_OFFSET, len(payload) if length is None else length)
    return bytes(setup) + bytes(PAYLOAD_OFFSET) + payload + bytes(0x100)


def make(tmp_path: Path, kind: str = "gzip", elf: bytes | None = None, **kw) -> Path:
    elf = HELLO.read_bytes() if elf is None else elf
    packed = COMPRESSORS[kind](elf) + struct.pack("<I", len(elf))       # the build's size trailer
    p = tmp_path / f"vmlinuz-{kind}"
    p.write_bytes(bzimage(packed, **kw))
    return p


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_every_compression_unpacks_to_the_same_elf(tmp_path, kind):
    img = load_image(make(tmp_path, kind), RAM)
    ref = load_image(HELLO, RAM)
    assert img.container == f"bzImage ({kind})"
    assert (img.entry, img.elf_entry) == (ref.entry, ref.elf_entry)
    assert [(s.paddr, s.memsz, s.data) for s in img.segments] == [(s.paddr, s.memsz, s.data) for s in ref.segments]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bzimage_boots_with_its_cmdline_and_initrd(tmp_path, backend):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(range(256)) * 40 + b"tail")
    m = Machine.from_board("rcar-virt")
    try:
        r = m.run(str(make(tmp_path, "lz4")), backend=backend, timeout=10,
                  cmdline="console=ttyS0 quiet", initrd=str(initrd))
        assert (r.status, r.reason) == (0, "exit"), r.message
        assert "Hello from iommu-lab" in r.console.decode()
        magic, version, _flags, nr, modlist, cmdline = struct.unpack_from(
            "<IIIIQQ", m.read_guest(START_INFO_ADDR, 32))
        assert (magic, version, nr, modlist, cmdline) == (0x336EC578, 1, 1, MODLIST_ADDR, CMDLINE_ADDR)
        assert m.read_guest(cmdline, 19) == b"console=ttyS0 quiet\0"[:19] and m.read_guest(cmdline + 19, 1) == b"\0"
        paddr, size, mod_cmdline, _ = struct.unpack("<QQQQ", m.read_guest(modlist, 32))
        assert size == initrd.stat().st_size and mod_cmdline == 0
        assert paddr % 4096 == 0 and paddr + size <= 128 << 20          # top of low RAM, page-aligned
        assert paddr >= max(s.paddr + s.memsz for s in load_image(HELLO, RAM).segments)
        assert m.read_guest(paddr, size) == initrd.read_bytes()
    finally:
        m.close()


def test_no_cmdline_and_no_initrd_leave_the_fields_zero(tmp_path):
    m = Machine.from_board("rcar-virt")
    try:
        assert m.run("hello", backend="emulated").status == 0
        _magic, _v, _f, nr, modlist, cmdline = struct.unpack_from("<IIIIQQ", m.read_guest(START_INFO_ADDR, 32))
        assert (nr, modlist, cmdline) == (0, 0, 0)
    finally:
        m.close()


def raw(tmp_path: Path, payload: bytes) -> Path:
    p = tmp_path / "vmlinuz-raw"
    p.write_bytes(bzimage(payload))
    return p


BAD = {
    "old-protocol": (lambda p: make(p, version=0x0206), "boot protocol 2.06 has no payload fields"),
    "payload-past-eof": (lambda p: make(p, length=1 << 30), "lies outside the file"),
    "lzo": (lambda p: raw(p, b"\x89LZO\0" + bytes(64)), "LZO"),
    "garbage": (lambda p: raw(p, bytes(64)), "unknown payload compression"),
    "corrupt-gzip": (lambda p: raw(p, b"\x1f\x8b\x08\0" + b"\xff" * 64), "corrupt"),
    "not-elf": (lambda p: make(p, elf=b"MZ" + bytes(4096)), "does not unpack to an ELF"),
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_decompression_stops_at_its_limit(kind):
    packed = COMPRESSORS[kind](bytes(3 << 20))
    assert decompress(packed, limit=3 << 20)[0] == bytes(3 << 20)
    with pytest.raises(BzImageError, match="unpacks to more than 2 MiB"):
        decompress(packed, limit=2 << 20)
    assert MAX_VMLINUX == 256 << 20


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bzimages_get_one_line(tmp_path, case):
    build, why = BAD[case]
    path = build(tmp_path)
    with pytest.raises(ImageError) as info:
        load_image(path, RAM)
    assert why in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_cli_refuses_a_long_cmdline_and_a_huge_initrd(tmp_path):
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(1 << 30)                 # sparse: refused by its size, never read
    for extra, why in ((["--cmdline", "x" * 5000], "at most 2047 characters"),
                       (["--initrd", str(huge)], "do not fit in guest RAM"),
                       (["--initrd", str(tmp_path)], "cannot read")):
        p = subprocess.run([sys.executable, "-m", "vmm.cli", "run", "hello", "--backend", "emulated", *extra],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr
        assert why in p.stderr and "Traceback" not in p.stderr
