"""Boards: TOML files that say what RAM, devices, addresses, IRQs and master wiring a machine has.

A board is data. ``load_board`` validates it against the device registry (``vmm.registry``: each
type's keys, their types and defaults, references to other devices and domains) and returns a
``BoardSpec`` whose device entries carry every default; ``vmm.machine`` builds the machine from it.
Every mistake is one line naming the file, the device and the key.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vmm.registry import REGISTRY, DeviceType, Key, RegistryError, closest

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
    isolation: str = "warn"
    boot_bypass: bool = False
    secure: bool = False                                  # dom0's memory is private (DESIGN section 7)
    devices: list[dict] = field(default_factory=list)
    domains: list[dict] = field(default_factory=list)     # extra CPU-less domains: {name, ram}
    source: str = ""



def board_paths() -> dict[str, Path]:
    """The boards shipped with iommu-lab (package data beside this module)."""
    folder = Path(__file__).resolve().parent / "boards"
    return {p.stem: p for p in folder.glob("*.toml")}


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
    known_keys = {"name", "description", "ram", "p2m", "unprotected", "isolation", "boot_bypass", "secure", "device",
                  "domain"}
    extra = set(data) - known_keys
    if extra:
        raise BoardError(f"{source}: unknown board key(s) {', '.join(sorted(extra))}")
    spec = BoardSpec(
        name=str(data.get("name", Path(source).stem)),
        description=str(data.get("description", "")),
        ram=parse_size(data.get("ram", "128M")),
        p2m=str(data.get("p2m", "direct")),
        unprotected=str(data.get("unprotected", "bypass")),
        isolation=str(data.get("isolation", "warn")),
        boot_bypass=bool(data.get("boot_bypass", False)),
        secure=data.get("secure", False),
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
    if spec.isolation not in ("warn", "fault", "off"):
        raise BoardError(f"{where}: isolation must be 'warn', 'fault' or 'off', not {spec.isolation!r}")
    if not isinstance(spec.secure, bool):
        raise BoardError(f"{where}: secure must be true or false, not {spec.secure!r}")
    if spec.ram < (2 << 20) or spec.ram % 4096:
        raise BoardError(f"{where}: ram must be at least 2 MiB and a multiple of 4 KiB")
    if spec.ram > (64 << 30):
        raise BoardError(f"{where}: ram above 64 GiB is not supported")
    domain_names = {"dom0"}
    for dom in spec.domains:
        if not isinstance(dom.get("name"), str) or dom["name"] in domain_names:
            raise BoardError(f"{where}: each extra domain needs a new name")
        domain_names.add(dom["name"])
        dom["ram"] = parse_size(dom.get("ram", "16M"))
        unknown = set(dom) - {"name", "ram", "secure"}
        if unknown:
            raise BoardError(f"{where}: domain {dom['name']!r}: unknown key(s) {', '.join(sorted(unknown))}")
        if not isinstance(dom.setdefault("secure", False), bool):
            raise BoardError(f"{where}: domain {dom['name']!r}: secure must be true or false")
    names: set[str] = set()
    for i, dev in enumerate(spec.devices):
        name = dev.setdefault("name", f"device{i}")
        if not isinstance(name, str):
            raise BoardError(f"{where}: device {i} has a name that is not a string: {name!r}")
        if name in names:
            raise BoardError(f"{where}: two devices are named {name!r}")
        names.add(name)
    for dev in spec.devices:
        keys = _keys_of(where, dev)
        _check_keys(where, dev, keys)
    for dev in spec.devices:
        for key in _keys_of(where, dev).values():
            value = dev.get(key.name)
            if key.ref is None or value is None:
                continue
            known = names - {dev["name"]} if key.ref == "device" else domain_names
            if value not in known:
                what = "IOMMU" if key.name == "iommu" else key.ref
                raise BoardError(f"{where}: device {dev['name']!r}: key {key.name!r} names unknown {what} "
                                 f"{value!r}{closest(value, known)}")


def device_type(where: str, type_name: object, device: str = "?") -> DeviceType:
    """The registered type of a board entry, or a one-line BoardError."""
    try:
        dtype = REGISTRY.get(type_name) if isinstance(type_name, str) else None
        known = REGISTRY.names()
    except RegistryError as e:
        raise BoardError(f"{where}: device {device!r}: {e}") from None
    if dtype is None or dtype.kind != "device":
        devices = [n for n in known if (t := REGISTRY.get(n)) is not None and t.kind == "device"]
        hint = closest(type_name, devices) if isinstance(type_name, str) else ""
        raise BoardError(f"{where}: device {device!r} has unknown type {type_name!r}{hint} "
                         f"(known: {', '.join(devices)})")
    return dtype


def _keys_of(where: str, dev: dict) -> dict[str, Key]:
    """The keys an entry may carry: its type's, its master wiring's, and its sub-type's."""
    dtype = device_type(where, dev.get("type"), dev["name"])
    keys = dtype.all_keys()
    if dtype.subtype_key is not None and isinstance(dev.get(dtype.subtype_key), str):
        sub_name = dev[dtype.subtype_key]
        try:
            sub = REGISTRY.get(sub_name)
        except RegistryError as e:
            raise BoardError(f"{where}: device {dev['name']!r}: {e}") from None
        if sub is None or sub.kind == "device":
            subs = [n for n in REGISTRY.names() if (t := REGISTRY.get(n)) is not None and t.kind != "device"]
            raise BoardError(f"{where}: device {dev['name']!r}: key {dtype.subtype_key!r} names unknown "
                             f"{dtype.name} backend {sub_name!r}{closest(sub_name, subs)} (known: {', '.join(subs)})")
        keys.update(sub.all_keys())
    return keys


def _check_keys(where: str, dev: dict, keys: dict[str, Key]) -> None:
    name = dev["name"]
    for k in dev:
        if k not in keys:
            raise BoardError(f"{where}: device {name!r}: unknown key {k!r}{closest(k, keys)} "
                             f"(type {dev['type']} accepts: {', '.join(keys)})")
    for key in keys.values():
        if key.name not in dev:
            if key.required:
                raise BoardError(f"{where}: device {name!r} needs a value for {key.name!r}")
            if key.default is not None:
                dev[key.name] = list(key.default) if isinstance(key.default, (list, tuple)) else key.default
            continue
        why = key.check(dev[key.name])
        if why is not None:
            raise BoardError(f"{where}: device {name!r}: key {key.name!r} {why}")


def describe_types() -> str:
    """Every registered device type with its keys (``vmm boards --types``)."""
    out = []
    try:
        types = REGISTRY.all()
    except RegistryError as e:
        raise BoardError(str(e)) from None
    for t in types:
        what = "virtio backend (on a virtio-mmio entry)" if t.kind == "virtio" else (
            "bus master" if t.master else "device")
        origin = f" [{t.origin}]" if t.origin else ""
        out.append(f"{t.name}: {what}{origin}{' -- ' + t.doc if t.doc else ''}")
        for key in t.all_keys().values():
            out.append(f"    {key.describe()}")
    return "\n".join(out)
