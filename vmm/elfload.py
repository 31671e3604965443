"""PVH ELF payloads: validate, place into guest RAM, describe with hvm_start_info.

Accepted: ELF64, little-endian, x86-64, an executable with a Xen PVH note
(XEN_ELFNOTE_PHYS32_ENTRY) and non-overlapping PT_LOAD segments that lie in guest RAM at or above
1 MiB -- the format that also boots in QEMU ``-kernel``, Firecracker and cloud-hypervisor.
Everything else is an ``ImageError`` with a one-line reason.

The file is read header by header, never whole: the ELF header, the program headers, the notes
(at most ``MAX_NOTES`` bytes) and then each segment's file bytes, only after every check has
passed -- so a segment can never be larger than guest RAM, and ``vmm info /dev/zero`` or a 10 GB
sparse file costs a few reads.
"""
from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vmm.bzimage import SETUP_HEAD, BzImageError, extract_vmlinux, is_bzimage

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578
START_INFO_ADDR = 0x6000
MEMMAP_ADDR = 0x7000
MODLIST_ADDR = 0x6040                # hvm_modlist_entry[] (32 bytes each), after the 56-byte start_info
CMDLINE_ADDR = 0x8000
CMDLINE_MAX = 2048                   # Linux's x86 COMMAND_LINE_SIZE, with the NUL
PAGE_SIZE = 4096
LOW_LIMIT = 1 << 20
E820_RAM = 1
MAX_NOTES = 64 << 10                 # bytes of note segments/sections read looking for the PVH note

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PT_LOAD, _PT_NOTE, _SHT_NOTE = 1, 4, 7
_ET_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_EM_NAMES = {3: "i386 (EM_386)", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
             62: "x86-64", 183: "AArch64 (EM_AARCH64)", 243: "RISC-V", 258: "LoongArch"}


class ImageError(Exception):
    """A payload that cannot be booted; the message is one line for the user."""


@dataclass
class Segment:
    paddr: int
    memsz: int
    data: bytes


@dataclass
class Image:
    path: str
    entry: int                       # PVH 32-bit physical entry point
    elf_entry: int
    segments: list[Segment] = field(default_factory=list)
    container: str = ""              # "bzImage (lz4)" when the ELF came out of a bzImage

    def describe(self) -> str:
        inside = f"{self.container} holding " if self.container else ""
        lines = [f"{self.path}: {inside}ELF64 x86-64, PVH entry {self.entry:#x} (e_entry {self.elf_entry:#x})"]
        for s in self.segments:
            lines.append(f"  LOAD {s.paddr:#010x}-{s.paddr + s.memsz:#010x} "
                         f"({len(s.data):#x} bytes from file, {s.memsz:#x} in memory)")
        return "\n".join(lines)


class _Reader:
    """Bounded reads at offsets of an open file, each checked against the file's size."""

    def __init__(self, f: BinaryIO, path: str, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size

    def read(self, off: int, n: int, what: str) -> bytes:
        if off + n > self.size:
            raise ImageError(f"{self.path}: truncated: {what} needs file bytes up to {off + n:#x}, "
                             f"the file has {self.size:#x}")
        self.f.seek(off)
        data = self.f.read(n)
        if len(data) != n:
            raise ImageError(f"{self.path}: truncated: short read of {what} at {off:#x}")
        return data


def _notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note in a note segment or section."""
    out = []
    o = 0
    while o + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, o)
        o += 12
        name = blob[o:o + namesz]
        o += (namesz + 3) & ~3
        desc = blob[o:o + descsz]
        o += (descsz + 3) & ~3
        if len(name) != namesz or len(desc) != descsz:
            break                     # a damaged note: stop, the PVH check below reports it missing
        out.append((name.rstrip(b"\0"), ntype, desc))
    return out


def _pvh_entry(r: _Reader, phdrs: list[tuple], shoff: int, shnum: int, shentsize: int) -> int | None:
    blobs = []
    budget = MAX_NOTES
    for p_type, _flags, off, _vaddr, _paddr, filesz, _memsz, _align in phdrs:
        if p_type == _PT_NOTE:
            if filesz > budget:
                raise ImageError(f"{r.path}: note segment of {filesz:#x} bytes (more than {MAX_NOTES >> 10} KiB "
                                 "of notes)")
            budget -= filesz
            blobs.append(r.read(off, filesz, "a note segment"))
    if not blobs and shoff and shnum:
        if shentsize != _SHDR.size:
            raise ImageError(f"{r.path}: malformed ELF: section header size {shentsize}, not {_SHDR.size}")
        table = r.read(shoff, shnum * _SHDR.size, "the section headers")
        for i in range(shnum):
            sh = _SHDR.unpack_from(table, i * _SHDR.size)
            if sh[1] == _SHT_NOTE:
                size = sh[5]
                if size > budget:
                    raise ImageError(f"{r.path}: note section of {size:#x} bytes (more than "
                                     f"{MAX_NOTES >> 10} KiB of notes)")
                budget -= size
                blobs.append(r.read(sh[4], size, "a note section"))
    for blob in blobs:
        for name, ntype, desc in _notes(blob):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) >= 8:
                    return struct.unpack_from("<Q", desc)[0]
                if len(desc) >= 4:
                    return struct.unpack_from("<I", desc)[0]
    return None


def load_image(path: str | Path, ram_ranges: list[tuple[int, int]]) -> Image:
    """Validate the ELF at ``path`` against guest RAM and read its segments (ImageError if unfit)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{path}: not a regular file")
            r = _Reader(f, path, st.st_size)
            head = f.read(SETUP_HEAD)
            f.seek(0)
            if head[:4] != b"\x7fELF" and is_bzimage(head):
                return _load_bzimage(r, head, ram_ranges)
            return _load(r, ram_ranges)
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


def _load_bzimage(r: _Reader, head: bytes, ram_ranges: list[tuple[int, int]]) -> Image:
    """A bzImage: its vmlinux ELF, unpacked in memory (bounded), is checked like any payload."""
    try:
        elf, kind = extract_vmlinux(r, head, r.size)
    except BzImageError as e:
        raise ImageError(f"{r.path}: bzImage: {e}") from None
    image = _load(_Reader(io.BytesIO(elf), f"{r.path} (its vmlinux)", len(elf)), ram_ranges)
    image.path, image.container = r.path, f"bzImage ({kind})"
    return image


def _load(r: _Reader, ram_ranges: list[tuple[int, int]]) -> Image:
    path = r.path
    head = r.f.read(_EHDR.size)
    if head[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not an ELF file")
    if len(head) < _EHDR.size:
        raise ImageError(f"{path}: truncated ELF header ({len(head)} bytes)")
    if head[4] != 2:
        raise ImageError(f"{path}: ELF{32 if head[4] == 1 else '?'} image; iommu-lab boots ELF64 only")
    if head[5] != 1:
        order = "big-endian" if head[5] == 2 else f"unknown byte order (EI_DATA {head[5]})"
        raise ImageError(f"{path}: {order} ELF; iommu-lab boots little-endian x86-64 images only")
    (_ident, e_type, e_machine, _version, e_entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _EHDR.unpack(head)
    if e_machine != 62:
        raise ImageError(f"{path}: built for {_EM_NAMES.get(e_machine, f'machine {e_machine}')}, not x86-64")
    if e_type != 2:
        name = _ET_NAMES.get(e_type, f"type {e_type}")
        raise ImageError(f"{path}: {name} is not an executable (link it with -static -no-pie)")
    if phnum == 0:
        raise ImageError(f"{path}: no loadable segments")
    if phentsize != _PHDR.size:
        raise ImageError(f"{path}: malformed ELF: program header size {phentsize}, not {_PHDR.size}")
    if phnum == 0xFFFF:
        raise ImageError(f"{path}: too many program headers (PN_XNUM)")
    table = r.read(phoff, phnum * _PHDR.size, "the program headers")
    phdrs = [_PHDR.unpack_from(table, i * _PHDR.size) for i in range(phnum)]
    entry = _pvh_entry(r, phdrs, shoff, shnum, shentsize)
    if entry is None:
        raise ImageError(f"{path}: no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY); the harness boots PVH only")
    loads = []
    for p_type, _flags, off, _vaddr, paddr, filesz, memsz, _align in phdrs:
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError(f"{path}: segment at {paddr:#x} has more file bytes than memory bytes")
        if off + filesz > r.size:
            raise ImageError(f"{path}: truncated: segment at {paddr:#x} needs file bytes up to "
                             f"{off + filesz:#x}, the file has {r.size:#x}")
        if paddr < LOW_LIMIT:
            raise ImageError(f"{path}: segment at {paddr:#x} lies below 1 MiB (link payloads at >= 1 MiB)")
        if not any(start <= paddr and paddr + memsz <= start + size for start, size in ram_ranges):
            raise ImageError(f"{path}: segment [{paddr:#x}, {paddr + memsz:#x}) lies outside guest RAM")
        loads.append((paddr, memsz, off, filesz))
    if not loads:
        raise ImageError(f"{path}: no loadable segments")
    ordered = sorted(loads)
    for (a, asz, _, _), (b, bsz, _, _) in zip(ordered, ordered[1:], strict=False):
        if b < a + asz:
            raise ImageError(f"{path}: PT_LOAD segments [{a:#x}, {a + asz:#x}) and [{b:#x}, {b + bsz:#x}) overlap")
    if not any(paddr <= entry < paddr + memsz for paddr, memsz, _, _ in loads):
        raise ImageError(f"{path}: PVH entry {entry:#x} is outside every loaded segment")
    if entry >= 1 << 32:
        raise ImageError(f"{path}: PVH entry {entry:#x} is not a 32-bit address")
    image = Image(path=path, entry=entry, elf_entry=e_entry)
    for paddr, memsz, off, filesz in loads:
        image.segments.append(Segment(paddr, memsz, r.read(off, filesz, f"the segment at {paddr:#x}")))
    return image


def read_initrd(path: str | Path, limit: int) -> bytes:
    """An initrd (or any boot module) file, refused with one line when it is not a regular file or
    is larger than ``limit`` bytes (the guest RAM that could hold it), before it is read."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"--initrd {path}: not a regular file")
            if st.st_size > limit:
                raise ImageError(f"--initrd {path}: {st.st_size:#x} bytes do not fit in guest RAM ({limit:#x} bytes)")
            return f.read(st.st_size)
    except OSError as e:
        raise ImageError(f"--initrd {path}: cannot read ({e.strerror or e})") from None


def _module_slots(image: Image, sizes: list[int], ram_ranges: list[tuple[int, int]]) -> list[int]:
    """Where each module goes: page-aligned, from the top of the RAM below 4 GiB downwards, above the
    payload's segments (where a kernel's early allocations do not reach them)."""
    top = max(start + size for start, size in ram_ranges if start < 1 << 32)
    top = min(top, 1 << 32)
    floor = max(s.paddr + s.memsz for s in image.segments)
    slots = []
    for n in sizes:
        at = (top - n) & ~(PAGE_SIZE - 1)
        if at < floor or not any(s <= at and at + n <= s + z for s, z in ram_ranges):
            raise ImageError(f"initrd of {n:#x} bytes does not fit in guest RAM between the kernel's end "
                             f"{floor:#x} and {top:#x} (give more --ram)")
        slots.append(at)
        top = at
    return slots


def place(image: Image, write, ram_ranges: list[tuple[int, int]], cmdline: str = "",
          modules: list[bytes] = ()) -> int:
    """Copy the segments into guest RAM and build hvm_start_info with the memory map, the command
    line and the module list (an initrd is module 0, as Linux's PVH entry reads it); returns its
    address (EBX)."""
    raw = cmdline.encode("ascii", "replace")
    if len(raw) >= CMDLINE_MAX or b"\0" in raw:
        raise ImageError(f"--cmdline: {len(raw)} bytes; a command line holds at most {CMDLINE_MAX - 1} "
                         "characters and no NUL")
    slots = _module_slots(image, [len(m) for m in modules], ram_ranges) if modules else []
    for s in image.segments:
        write(s.paddr, s.data + bytes(s.memsz - len(s.data)))
    memmap = b"".join(struct.pack("<QQII", start, size, E820_RAM, 0) for start, size in ram_ranges)
    write(MEMMAP_ADDR, memmap)
    write(CMDLINE_ADDR, raw + b"\0")
    modlist = b""
    for at, data in zip(slots, modules, strict=True):
        write(at, data)
        modlist += struct.pack("<QQQQ", at, len(data), 0, 0)
    if modlist:
        write(MODLIST_ADDR, modlist)
    info = struct.pack("<IIIIQQQQII", START_INFO_MAGIC, 1, 0, len(modules), MODLIST_ADDR if modules else 0,
                       CMDLINE_ADDR if raw else 0, 0, MEMMAP_ADDR, len(ram_ranges), 0)
    write(START_INFO_ADDR, info)
    return START_INFO_ADDR


def describe_sections(path: str, entry: int) -> list[str]:
    """``vmm info``'s second half: sections and symbols, read with pyelftools from a file that
    ``load_image`` has already validated (so every header it reads lies inside the file). The loader
    itself reads only headers and segments, with bounded reads, and never needs pyelftools."""
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection
    except ImportError:                   # pragma: no cover - pyelftools is a dependency
        return ["  (sections and symbols: pyelftools is not installed)"]
    lines: list[str] = []
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if sec.name and sec["sh_type"] != "SHT_NULL" and sec["sh_flags"] & 2:      # SHF_ALLOC
                    lines.append(f"  section {sec.name:<16} {sec['sh_addr']:#010x} {sec['sh_size']:#x} bytes")
            symtab = elf.get_section_by_name(".symtab")
            if isinstance(symtab, SymbolTableSection):
                funcs = [s for s in symtab.iter_symbols() if s["st_info"]["type"] == "STT_FUNC"]
                objs = sum(1 for s in symtab.iter_symbols() if s["st_info"]["type"] == "STT_OBJECT")
                at_entry = [s.name for s in funcs if s["st_value"] == entry]
                lines.append(f"  symbols: {len(funcs)} functions, {objs} objects"
                             f"{'; the entry is ' + at_entry[0] if at_entry else ''} (debuggers: vmm run --gdb)")
            else:
                lines.append("  symbols: none (stripped)")
    except (ELFError, OSError, ValueError, KeyError, AttributeError) as e:
        lines.append(f"  (sections and symbols unreadable: {e})")
    return lines
