"""Where payload ELFs are found: a path, or a name looked up among the built guest images
(the source tree's ``guest_images/out`` in a checkout, ``vmm/images`` package data when installed)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_IMAGE = "demo"
_HERE = Path(__file__).resolve().parent


def image_dirs() -> list[Path]:
    return [_HERE.parent / "guest_images" / "out", _HERE / "images"]


def find_image(name_or_path: str | None) -> str:
    """The ELF path for a payload name or path; an unknown name is an ImageError listing the
    payloads that are built (a path, or a name ending in .elf, is left to the loader to check)."""
    name = name_or_path or DEFAULT_IMAGE
    p = Path(name)
    if p.exists() or "/" in name or name.endswith(".elf"):
        return str(p)
    for d in image_dirs():
        cand = d / f"{name}.elf"
        if cand.is_file():
            return str(cand)
    from vmm.elfload import ImageError
    known = available_images()
    listing = f"built payloads: {', '.join(known)}" if known else "no payload is built (run `make guests`)"
    raise ImageError(f"no payload named {name!r}; {listing}; or give the path of an ELF file")


def available_images() -> list[str]:
    names = set()
    for d in image_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.elf"))
    return sorted(names)
