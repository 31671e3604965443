"""PVH ELF payloads: validate with pyelftools, place into guest RAM, describe with hvm_start_info.

Accepted: ELF64, x86-64, an executable with a Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY) and
PT_LOAD segments that lie in guest RAM at or above 1 MiB -- the format that also boots in
QEMU ``-kernel``, Firecracker and cloud-hypervisor. Everything else is an ``ImageError`` with
a one-line reason.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578
START_INFO_ADDR = 0x6000
MEMMAP_ADDR = 0x7000
LOW_LIMIT = 1 << 20
E820_RAM = 1


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

    def describe(self) -> str:
        lines = [f"{self.path}: ELF64 x86-64, PVH entry {self.entry:#x} (e_entry {self.elf_entry:#x})"]
        for s in self.segments:
            lines.append(f"  LOAD {s.paddr:#010x}-{s.paddr + s.memsz:#010x} "
                         f"({len(s.data):#x} bytes from file, {s.memsz:#x} in memory)")
        return "\n".join(lines)


def _pvh_entry(elf: ELFFile) -> int | None:
    notes = []
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            notes.extend(seg.iter_notes())
    if not notes:
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                notes.extend(sec.iter_notes())
    for note in notes:
        if note["n_name"] == "Xen" and note["n_type"] in (XEN_ELFNOTE_PHYS32_ENTRY, "XEN_ELFNOTE_PHYS32_ENTRY"):
            desc = note["n_desc"]
            raw = desc.encode("latin-1") if isinstance(desc, str) else bytes(desc)
            if len(raw) >= 8:
                return struct.unpack_from("<Q", raw)[0]
            if len(raw) >= 4:
                return struct.unpack_from("<I", raw)[0]
    return None


def load_image(path: str | Path, ram_ranges: list[tuple[int, int]]) -> Image:
    path = str(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    if blob[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not an ELF file")
    if len(blob) < 64:
        raise ImageError(f"{path}: truncated ELF header ({len(blob)} bytes)")
    if blob[4] != 2:
        raise ImageError(f"{path}: ELF{32 if blob[4] == 1 else '?'} image; iommu-lab boots ELF64 only")
    try:
        import io
        elf = ELFFile(io.BytesIO(blob))
        machine = elf["e_machine"]
        if machine != "EM_X86_64":
            raise ImageError(f"{path}: built for {machine}, not x86-64")
        if elf["e_type"] != "ET_EXEC":
            raise ImageError(f"{path}: {elf['e_type']} is not an executable (link it with -static -no-pie)")
        entry = _pvh_entry(elf)
        if entry is None:
            raise ImageError(f"{path}: no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY); the harness boots PVH only")
        image = Image(path=path, entry=entry, elf_entry=elf["e_entry"])
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            paddr, filesz, memsz, off = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"], seg["p_offset"]
            if filesz > memsz:
                raise ImageError(f"{path}: segment at {paddr:#x} has more file bytes than memory bytes")
            if off + filesz > len(blob):
                raise ImageError(f"{path}: truncated: segment at {paddr:#x} needs file bytes up to "
                                 f"{off + filesz:#x}, the file has {len(blob):#x}")
            if paddr < LOW_LIMIT:
                raise ImageError(f"{path}: segment at {paddr:#x} lies below 1 MiB (link payloads at >= 1 MiB)")
            if not any(start <= paddr and paddr + memsz <= start + size for start, size in ram_ranges):
                raise ImageError(f"{path}: segment [{paddr:#x}, {paddr + memsz:#x}) lies outside guest RAM")
            image.segments.append(Segment(paddr, memsz, blob[off:off + filesz]))
    except ImageError:
        raise
    except (ELFError, struct.error, ValueError, KeyError, IndexError, AssertionError) as e:
        raise ImageError(f"{path}: malformed or truncated ELF ({e})") from None
    if not image.segments:
        raise ImageError(f"{path}: no loadable segments")
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in image.segments):
        raise ImageError(f"{path}: PVH entry {entry:#x} is outside every loaded segment")
    if entry >= 1 << 32:
        raise ImageError(f"{path}: PVH entry {entry:#x} is not a 32-bit address")
    return image


def place(image: Image, write, ram_ranges: list[tuple[int, int]]) -> int:
    """Copy the segments into guest RAM and build hvm_start_info; returns its address (EBX)."""
    for s in image.segments:
        write(s.paddr, s.data + bytes(s.memsz - len(s.data)))
    memmap = b"".join(struct.pack("<QQII", start, size, E820_RAM, 0) for start, size in ram_ranges)
    write(MEMMAP_ADDR, memmap)
    info = struct.pack("<IIIIQQQQII", START_INFO_MAGIC, 1, 0, 0, 0, 0, 0, MEMMAP_ADDR, len(ram_ranges), 0)
    write(START_INFO_ADDR, info)
    return START_INFO_ADDR
