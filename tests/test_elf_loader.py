"""Bad images get one line saying why, and `vmm run` exits 2; `vmm info` shows what loads."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.elfload import ImageError, load_image
from vmm.images import find_image
from vmm.machine import ram_ranges

RAM = ram_ranges(128 << 20)
HELLO = Path(find_image("hello"))


def patched(tmp_path: Path, name: str, edit) -> Path:
    blob = bytearray(HELLO.read_bytes())
    edit(blob)
    p = tmp_path / name
    p.write_bytes(bytes(blob))
    return p


def phdrs(blob: bytes):
    phoff, = struct.unpack_from("<Q", blob, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", blob, 0x36)
    return [(phoff + i * phentsize, struct.unpack_from("<IIQQQQQQ", blob, phoff + i * phentsize))
            for i in range(phnum)]


def set_load_paddr(blob: bytearray, paddr: int) -> None:
    for off, (ptype, *_rest) in phdrs(blob):
        if ptype == 1:        # PT_LOAD
            struct.pack_into("<QQ", blob, off + 16, paddr, paddr)
            return


def drop_notes(blob: bytearray) -> None:
    for off, (ptype, *_rest) in phdrs(blob):
        if ptype == 4:        # PT_NOTE -> PT_NULL
            struct.pack_into("<I", blob, off, 0)
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    for i in range(shnum):
        at = shoff + i * shentsize
        if struct.unpack_from("<I", blob, at + 4)[0] == 7:   # SHT_NOTE -> SHT_PROGBITS
            struct.pack_into("<I", blob, at + 4, 1)


CASES = {
    "truncated": (lambda b: b.__delitem__(slice(0x1200, None)), "truncated"),
    "wrong-arch": (lambda b: struct.pack_into("<H", b, 0x12, 183), "not x86-64"),   # EM_AARCH64
    "elf32": (lambda b: b.__setitem__(4, 1), "ELF64 only"),
    "note-less": (drop_notes, "no Xen PVH note"),
    "out-of-ram": (lambda b: set_load_paddr(b, 0x20000000), "outside guest RAM"),
    "below-1mib": (lambda b: set_load_paddr(b, 0x8000), "below 1 MiB"),
    "not-elf": (lambda b: b.__setitem__(slice(0, 4), b"MZ\0\0"), "not an ELF"),
    "tiny": (lambda b: b.__delitem__(slice(20, None)), "truncated"),
    "big-endian": (lambda b: b.__setitem__(5, 2), "big-endian ELF"),
    "overlapping-loads": (lambda b: set_nth_load_paddr(b, 1, 0x101000), "overlap"),
    "huge-note": (lambda b: set_note_filesz(b, 10 << 30), "note segment"),
    "huge-segment": (lambda b: set_nth_load_field(b, 0, 40, 10 << 30), "outside guest RAM"),
}


def set_nth_load_field(blob: bytearray, n: int, field_off: int, value: int) -> None:
    loads = [off for off, (ptype, *_rest) in phdrs(blob) if ptype == 1]
    struct.pack_into("<Q", blob, loads[n] + field_off, value)


def set_nth_load_paddr(blob: bytearray, n: int, paddr: int) -> None:
    set_nth_load_field(blob, n, 16, paddr)
    set_nth_load_field(blob, n, 24, paddr)


def set_note_filesz(blob: bytearray, size: int) -> None:
    for off, (ptype, *_rest) in phdrs(blob):
        if ptype == 4:
            struct.pack_into("<Q", blob, off + 32, size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_one_line_reason(tmp_path, case):
    edit, words = CASES[case]
    path = patched(tmp_path, f"{case}.elf", edit)
    with pytest.raises(ImageError) as info:
        load_image(path, RAM)
    msg = str(info.value)
    assert words in msg and "\n" not in msg


@pytest.mark.parametrize("case", ["truncated", "wrong-arch", "note-less", "out-of-ram"])
def test_cli_bad_image_exits_2_with_one_line(tmp_path, case):
    path = patched(tmp_path, f"{case}.elf", CASES[case][0])
    r = subprocess.run([sys.executable, "-m", "vmm", "run", str(path), "--backend", "emulated"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("vmm: unprotected")]
    assert len(lines) == 1 and CASES[case][1] in lines[0] and "Traceback" not in r.stderr


def test_missing_image_and_unknown_board_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmm", "run", str(tmp_path / "nope.elf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vmm", "run", "hello", "--board", "no-such-board"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no board" in r.stderr and "Traceback" not in r.stderr


def test_info_lists_segments():
    r = subprocess.run([sys.executable, "-m", "vmm", "info", str(HELLO)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "PVH entry 0x100000" in r.stdout and "LOAD 0x00100000" in r.stdout


@pytest.mark.parametrize("name, words", [("/dev/zero", "not a regular file"), ("sparse", "not an ELF file"),
                                         ("dir", "cannot read")])
def test_special_and_huge_files_are_refused_without_reading_them(tmp_path, name, words):
    path = {"/dev/zero": "/dev/zero", "sparse": str(tmp_path / "sparse.elf"), "dir": str(tmp_path)}[name]
    if name == "sparse":
        with open(path, "wb") as f:
            f.truncate(10 << 30)
    with pytest.raises(ImageError) as info:
        load_image(path, RAM)
    assert words in str(info.value)


def test_a_valid_header_on_a_huge_sparse_file_reads_only_its_segments(tmp_path):
    p = tmp_path / "padded.elf"
    with open(p, "wb") as f:
        f.write(HELLO.read_bytes())
        f.truncate(10 << 30)
    img = load_image(p, RAM)
    assert sum(len(s.data) for s in img.segments) < 0x10000


def test_info_lists_sections_and_symbols_with_pyelftools(capsys):
    from vmm import cli
    assert cli.main(["info", "demo"]) == 0
    out = capsys.readouterr().out
    assert "  section .text            0x00100000 " in out
    assert "the entry is _start32" in out and " functions, " in out
