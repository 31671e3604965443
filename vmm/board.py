"""Boards: TOML files that say what RAM, devices, addresses, IRQs and master wiring a machine has.

A board is data. ``load_board`` validates it and returns a ``BoardSpec``; ``vmm.machine``
builds the machine from it. Device types map to builder functions named here as strings,
so adding a device model means one line in ``DEVICE_TYPES`` and a ``build(ctx, spec)`` beside
the model.
"""
from __future__ import annotations

import importlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

DEVICE_TYPES: dict[str, str] = {
    "sysinfo": "vmm.wiring:build_sysinfo",
    "const": "vmm.wiring:build_const",
    "dma": "vmm.wiring:build_dma",
    "ipmmu": "devices.ipmmu:build",
    "virtio-mmio": "devices.virtio_mmio:build",
}

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.I)


class BoardError(Exception):
    """A board that cannot be built; the message is one line for the user."""


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise BoardError(f"cannot read size {value!r} (use bytes or a K/M/G suffix)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


@dataclass
class BoardSpec:
    name: str
    description: str = ""
    ram: int = 128 << 20
    p2m: str = "direct"
    unprotected: str = "bypass"
    boot_bypass: bool = False
    devices: list[dict] = field(default_factory=list)
    domains: list[dict] = field(default_factory=list)     # extra CPU-less domains: {name, ram}
    source: str = ""


def builder(type_name: str):
    target = DEVICE_TYPES[type_name]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def board_paths() -> dict[str, Path]:
    folder = resources.files("vmm") / "boards"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def list_boards() -> list[BoardSpec]:
    return [load_board(str(path)) for _, path in sorted(board_paths().items())]


def load_board(name_or_path: str) -> BoardSpec:
    known = board_paths()
    path = known.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise BoardError(f"no board {name_or_path!r} (known: {', '.join(sorted(known))})")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BoardError(f"{path}: {e}") from None
    return parse_board(data, str(path))


def parse_board(data: dict, source: str = "<dict>") -> BoardSpec:
    known_keys = {"name", "description", "ram", "p2m", "unprotected", "boot_bypass", "device", "domain"}
    extra = set(data) - known_keys
    if extra:
        raise BoardError(f"{source}: unknown board key(s) {', '.join(sorted(extra))}")
    spec = BoardSpec(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        ram=parse_size(data.get("ram", "128M")),
        p2m=str(data.get("p2m", "direct")),
        unprotected=str(data.get("unprotected", "bypass")),
        boot_bypass=bool(data.get("boot_bypass", False)),
        devices=[dict(d) for d in data.get("device", [])],
        domains=[dict(d) for d in data.get("domain", [])],
        source=source,
    )
    validate(spec)
    return spec


def validate(spec: BoardSpec) -> None:
    where = spec.source
    if spec.p2m not in ("direct", "scattered"):
        raise BoardError(f"{where}: p2m must be 'direct' or 'scattered', not {spec.p2m!r}")
    if spec.unprotected not in ("bypass", "fault"):
        raise BoardError(f"{where}: unprotected must be 'bypass' or 'fault', not {spec.unprotected!r}")
    if spec.ram < (2 << 20) or spec.ram % 4096:
        raise BoardError(f"{where}: ram must be at least 2 MiB and a multiple of 4 KiB")
    if spec.ram > (64 << 30):
        raise BoardError(f"{where}: ram above 64 GiB is not supported")
    names = set()
    for i, dev in enumerate(spec.devices):
        kind, name = dev.get("type"), dev.get("name", f"device{i}")
        if kind not in DEVICE_TYPES:
            raise BoardError(f"{where}: device {name!r} has unknown type {kind!r} "
                             f"(known: {', '.join(sorted(DEVICE_TYPES))})")
        if name in names:
            raise BoardError(f"{where}: two devices are named {name!r}")
        names.add(name)
        dev["name"] = name
        if not isinstance(dev.get("base"), int):
            raise BoardError(f"{where}: device {name!r} needs an integer base address")
    for dev in spec.devices:
        if "iommu" in dev and dev["iommu"] not in names:
            raise BoardError(f"{where}: device {dev['name']!r} sits behind unknown IOMMU {dev['iommu']!r}")
    domain_names = {"dom0"}
    for dom in spec.domains:
        if "name" not in dom or dom["name"] in domain_names:
            raise BoardError(f"{where}: each extra domain needs a new name")
        domain_names.add(dom["name"])
        dom["ram"] = parse_size(dom.get("ram", "16M"))
    for dev in spec.devices:
        if dev.get("domain", "dom0") not in domain_names:
            raise BoardError(f"{where}: device {dev['name']!r} belongs to unknown domain {dev['domain']!r}")
