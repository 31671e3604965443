"""Linux bzImages (``/boot/vmlinuz-*``) as payloads: find the compressed ELF vmlinux inside.

A bzImage is the real-mode setup code, then the protected-mode part, in which the build placed
the compressed ``vmlinux`` (an ELF that keeps its program headers and so its Xen PVH note).
The setup header (Documentation/arch/x86/boot.rst, protocol 2.08 and later) says where:
``payload_offset`` (0x248) is counted from the start of the protected-mode code, which begins
``(setup_sects + 1) * 512`` bytes into the file, and ``payload_length`` (0x24C) is its size. The
format is told by the payload's magic, as the kernel's own decompressor does: gzip, xz, lzma and
bzip2 through the standard library, lz4 (the legacy frame format) and zstd through the pinned
``lz4`` and ``zstandard`` packages. LZO is refused with a one-line reason.

Every size is checked before anything is allocated or read: the payload must lie in the file,
and decompression stops at ``MAX_VMLINUX`` bytes, so a hostile file costs bounded memory.
"""
from __future__ import annotations

import io
import struct
from typing import Protocol

MAX_VMLINUX = 256 << 20          # an x86-64 distribution vmlinux is 30-70 MiB
SETUP_HEAD = 0x250               # bytes of the file the header checks need
MIN_VERSION = 0x208              # payload_offset/payload_length appeared in boot protocol 2.08
_LZ4_LEGACY_MAGIC = 0x184C2102
_LZ4_LEGACY_BLOCK = 8 << 20      # the legacy frame's fixed block size (uncompressed)


class BzImageError(ValueError):
    """A bzImage whose payload cannot be found or unpacked; one line for the user."""


class _Reads(Protocol):
    def read(self, off: int, n: int, what: str) -> bytes: ...


def is_bzimage(head: bytes) -> bool:
    """The boot sector signature and the setup header's "HdrS" magic."""
    return len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xAA" and head[0x202:0x206] == b"HdrS"


def payload_span(head: bytes, file_size: int) -> tuple[int, int]:
    """(file offset, length) of the compressed payload, from the setup header."""
    if len(head) < SETUP_HEAD:
        raise BzImageError(f"truncated setup header ({len(head)} bytes)")
    version, = struct.unpack_from("<H", head, 0x206)
    if version < MIN_VERSION:
        raise BzImageError(f"boot protocol {version >> 8}.{version & 0xFF:02d} has no payload fields "
                           "(2.08 or later needed; boot its vmlinux ELF instead)")
    setup_sects = head[0x1F1] or 4              # 0 means 4, for old kernels (boot.rst)
    payload_offset, payload_length = struct.unpack_from("<II", head, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if payload_length == 0 or start + payload_length > file_size:
        raise BzImageError(f"payload [{start:#x}, +{payload_length:#x}) lies outside the file "
                           f"({file_size:#x} bytes)")
    return start, payload_length


def compression(data: bytes) -> str:
    """The payload's format, by its magic (as arch/x86/boot/compressed/misc.c builds it)."""
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if data[:3] == b"\x5d\x00\x00":
        return "lzma"
    if data[:3] == b"BZh":
        return "bzip2"
    if data[:4] == struct.pack("<I", _LZ4_LEGACY_MAGIC):
        return "lz4"
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:4] == b"\x89LZO":
        return "lzo"
    return "unknown"


def _bounded(out: bytes, kind: str, limit: int) -> bytes:
    if len(out) > limit:
        raise BzImageError(f"{kind} payload unpacks to more than {limit >> 20} MiB")
    return out


def _lz4_legacy(data: bytes, limit: int) -> bytes:
    """The lz4 legacy frame: the magic, then blocks of (le32 compressed size, raw LZ4 block), each
    at most 8 MiB uncompressed. The kernel build appends the le32 uncompressed size, which a
    reader tells apart because it cannot hold a whole block after it."""
    try:
        import lz4.block
    except ImportError:
        raise BzImageError("lz4 payload needs the 'lz4' package (pip install -r requirements.txt)") from None
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        size, = struct.unpack_from("<I", data, pos)
        if size == _LZ4_LEGACY_MAGIC:            # a concatenated frame
            pos += 4
            continue
        if pos + 4 + size > len(data):
            break                                 # the size trailer (or trailing bytes)
        try:
            out += lz4.block.decompress(data[pos + 4:pos + 4 + size], uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise BzImageError(f"lz4 payload is corrupt at {pos:#x}: {e}") from None
        _bounded(out, "lz4", limit)
        pos += 4 + size
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise BzImageError("zstd payload needs the 'zstandard' package (pip install -r requirements.txt)") from None
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            return _bounded(r.read(limit + 1), "zstd", limit)
    except zstandard.ZstdError as e:
        raise BzImageError(f"zstd payload is corrupt: {e}") from None


def decompress(data: bytes, limit: int = MAX_VMLINUX) -> tuple[bytes, str]:
    """(the unpacked vmlinux, the format name); more than ``limit`` bytes out is an error."""
    import bz2  # here, not at import: a PVH payload's run never needs them
    import lzma
    import zlib

    kind = compression(data)
    try:
        if kind == "gzip":
            return _bounded(zlib.decompressobj(31).decompress(data, limit + 1), kind, limit), kind
        if kind == "xz":
            return _bounded(lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data, limit + 1), kind, limit), kind
        if kind == "lzma":
            return _bounded(lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data, limit + 1), kind, limit), kind
        if kind == "bzip2":
            return _bounded(bz2.BZ2Decompressor().decompress(data, limit + 1), kind, limit), kind
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise BzImageError(f"{kind} payload is corrupt: {e}") from None
    if kind == "lz4":
        return _lz4_legacy(data, limit), kind
    if kind == "zstd":
        return _zstd(data, limit), kind
    if kind == "lzo":
        raise BzImageError("LZO-compressed kernel: not supported (gzip, xz, lzma, bzip2, lz4, zstd are)")
    raise BzImageError(f"unknown payload compression (magic {data[:4].hex()})")


def extract_vmlinux(r: _Reads, head: bytes, file_size: int) -> tuple[bytes, str]:
    """The ELF vmlinux inside a bzImage and its compression name; BzImageError when unfit."""
    start, length = payload_span(head, file_size)
    elf, kind = decompress(r.read(start, length, "the compressed kernel"))
    if elf[:4] != b"\x7fELF":
        raise BzImageError(f"the {kind} payload does not unpack to an ELF vmlinux")
    return elf, kind
