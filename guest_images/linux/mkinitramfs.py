"""Write a gzip-compressed cpio (newc) initramfs from a list of (archive path, source file or
None for a directory, mode): the format the kernel unpacks (Documentation/driver-api/
early-userspace/buffer-format.rst), written here so that no cpio tool is needed.

Usage: python mkinitramfs.py OUT busybox=PATH init=PATH labexit=PATH
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path


def entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def build(out: Path, busybox: Path, init: Path, labexit: Path) -> None:
    files = [("bin", None, 0o040755), ("dev", None, 0o040755), ("proc", None, 0o040755),
             ("sys", None, 0o040755), ("bin/busybox", busybox, 0o100755), ("bin/labexit", labexit, 0o100755),
             ("init", init, 0o100755)]
    blob = b""
    for ino, (name, src, mode) in enumerate(files, 1):
        blob += entry(name, mode, src.read_bytes() if src else b"", ino)
    blob += entry("TRAILER!!!", 0, b"", 0)
    out.write_bytes(gzip.compress(blob + b"\0" * (-len(blob) % 512), mtime=0))


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    build(Path(sys.argv[1]), Path(args["busybox"]), Path(args["init"]), Path(args["labexit"]))
