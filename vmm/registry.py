"""The device registry: every device type a board can name, built-in or plugin, found one way.

A model declares its type beside itself as a ``DeviceType`` (name, builder, the board keys it
accepts with their types and defaults, whether it is a bus master) and is announced through the
``iommu_lab.devices`` entry-point group, the way pytest finds its plugins. iommu-lab's own
models are announced by its own ``pyproject.toml`` exactly like a third party's, so there is one
table, and ``vmm`` never imports a device module by name: a board loads the modules of the types
it names, and nothing else (``import vmm.machine`` imports no device at all).

The key schema is what makes a board typo loud: ``iomu = "ipmmu_ds1"`` would otherwise build a
master with no IOMMU, whose DMA then reaches machine memory untranslated.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GROUP = "iommu_lab.devices"


class RegistryError(Exception):
    """A plugin that cannot be loaded or a type defined twice; the message is one line."""


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()

_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", list: "a list"}
_PLURALS = {int: "integers", str: "strings", bool: "booleans"}


@dataclass(frozen=True)
class Key:
    """One board key of a device entry.

    ``ref`` makes the value a reference checked at load time: ``"device"`` (the name of another
    device entry) or ``"domain"`` (dom0 or a ``[[domain]]``). ``items`` is the element type of a
    list. ``choices`` closes the set of accepted values.
    """

    name: str
    type: type
    default: Any = REQUIRED
    doc: str = ""
    ref: str | None = None
    items: type | None = None
    choices: tuple = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if not _is(value, self.type):
            return f"must be {_TYPE_NAMES.get(self.type, self.type.__name__)}, not {value!r}"
        if self.items is not None and not all(_is(v, self.items) for v in value):
            return f"must be a list of {_PLURALS.get(self.items, self.items.__name__)}, not {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(repr(c) for c in self.choices)}, not {value!r}"
        return None

    def describe(self) -> str:
        kind = _TYPE_NAMES.get(self.type, self.type.__name__).split()[-1]
        if self.choices:
            kind = "|".join(repr(c) for c in self.choices)
        dflt = "required" if self.required else "optional" if self.default is None else f"default {self.default!r}"
        if isinstance(self.default, int) and not isinstance(self.default, bool) and self.default >= 0x100:
            dflt = f"default {self.default:#x}"
        return f"{self.name} ({kind}, {dflt}){': ' + self.doc if self.doc else ''}"


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# Every entry has these; masters also get MASTER_KEYS (the wiring the machine applies to their DMA).
COMMON_KEYS = (
    Key("type", str, doc="the registered device type"),
    Key("name", str, doc="unique on the board"),
    Key("base", int, doc="MMIO base address (a port number on the port bus)"),
    Key("bus", str, "mmio", "the bus the window sits on", choices=("mmio", "pio")),
)
MASTER_KEYS = (
    Key("iommu", str, None, "the IOMMU device the master's DMA goes through (absent: the board's "
        "`unprotected` policy)", ref="device"),
    Key("master", int, 0, "micro-TLB number or endpoint ID on that IOMMU"),
    Key("domain", str, "dom0", "the domain the master belongs to", ref="domain"),
)


@dataclass(frozen=True)
class DeviceType:
    """A device model as boards name it.

    ``build(ctx, spec)`` gets a ``vmm.wiring.BuildContext`` (the model's only door to the machine)
    and the entry with every key's default filled in, and returns ``(bus device, window size)``.
    A ``virtio`` type is a backend for the ``virtio-mmio`` transport: its builder returns the
    backend, and its keys are accepted on the transport entry that names it (``backend = ...``).
    ``subtype_key`` names the key whose value is such a sub-type (the transport's ``backend``).
    """

    name: str
    build: Callable[..., Any]
    keys: tuple[Key, ...] = ()
    master: bool = False
    doc: str = ""
    kind: str = "device"                 # "device" or "virtio"
    subtype_key: str | None = None
    origin: str = field(default="", compare=False)

    def all_keys(self) -> dict[str, Key]:
        keys = {k.name: k for k in COMMON_KEYS} if self.kind == "device" else {}
        if self.master:
            keys.update((k.name, k) for k in MASTER_KEYS)
        keys.update((k.name, k) for k in self.keys)
        return keys


class Registry:
    """Device types by name, loaded lazily from entry points (or registered directly by tests)."""

    def __init__(self, group: str = GROUP) -> None:
        self.group = group
        self._types: dict[str, DeviceType] = {}
        self._points: dict[str, EntryPoint] | None = None

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._points is None:
            points: dict[str, EntryPoint] = {}
            for ep in find_entry_points(self.group):
                other = points.get(ep.name)
                if other is not None and other.value != ep.value:
                    raise RegistryError(f"device type {ep.name!r} is defined twice: {other.value} and {ep.value}")
                points[ep.name] = ep
            self._points = points
        return self._points

    def register(self, dtype: DeviceType) -> DeviceType:
        """Add a type by hand (tests, embedding); the same checks as an entry point's."""
        old = self._types.get(dtype.name)
        if old is not None and old is not dtype:
            raise RegistryError(f"device type {dtype.name!r} is already registered ({old.origin or old.build})")
        self._types[dtype.name] = dtype
        return dtype

    def get(self, name: str) -> DeviceType | None:
        dtype = self._types.get(name)
        if dtype is not None:
            return dtype
        ep = self._entry_points().get(name)
        if ep is None:
            return None
        try:
            module, _, attr = ep.value.partition(":")
            loaded = importlib.import_module(module.strip())
            for part in attr.strip().split(".") if attr else ():
                loaded = getattr(loaded, part)
        except Exception as e:  # noqa: BLE001 - a broken plugin is a one-line error, not a traceback
            raise RegistryError(f"device type {name!r}: cannot load {ep.value}: {e}") from None
        if not isinstance(loaded, DeviceType) or loaded.name != name:
            raise RegistryError(f"device type {name!r}: entry point {ep.value} is not DeviceType({name!r})")
        origin = ep.dist or ep.value
        object.__setattr__(loaded, "origin", origin)
        self._types[name] = loaded
        return loaded

    def names(self) -> list[str]:
        return sorted(set(self._types) | set(self._entry_points()))

    def all(self) -> list[DeviceType]:
        return [t for t in (self.get(n) for n in self.names()) if t is not None]


@dataclass(frozen=True)
class EntryPoint:
    name: str
    value: str          # "module:attribute"
    dist: str           # "distribution version", for listings


def find_entry_points(group: str) -> list[EntryPoint]:
    """The installed distributions' entry points of ``group``.

    Reads ``entry_points.txt`` of every ``*.dist-info`` / ``*.egg-info`` on ``sys.path`` directly:
    ``importlib.metadata`` would find the same, but importing it (and the e-mail parser it pulls in)
    costs a fifth of the command line's start-up. Path entries that are not plain folders (zip
    files) are left to ``importlib.metadata``.
    """
    found: list[EntryPoint] = []
    seen: set[str] = set()
    odd = False
    for entry in sys.path:
        folder = entry or "."
        if not os.path.isdir(folder):
            odd = odd or os.path.isfile(folder)
            continue
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        for info in names:
            dist = info.rsplit(".", 1)[0]
            key = dist.split("-")[0].lower().replace("_", "-")
            if key in seen:
                continue                    # the first on sys.path wins, as importlib.metadata does
            path = os.path.join(folder, info, "entry_points.txt")
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            seen.add(key)
            section = None
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("[") and line.endswith("]"):
                    section = line[1:-1].strip()
                elif section == group and "=" in line and not line.startswith(("#", ";")):
                    name, value = (x.strip() for x in line.split("=", 1))
                    dname, _, version = dist.partition("-")
                    found.append(EntryPoint(name, value, f"{dname.replace('_', '-')} {version}".strip()))
    if odd:
        from importlib import metadata

        for ep in metadata.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            if dist is None or dist.name.lower().replace("_", "-") not in seen:
                found.append(EntryPoint(ep.name, ep.value, f"{dist.name} {dist.version}" if dist else ep.value))
    return found


REGISTRY = Registry()


def closest(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for a likely typo, else ``""``."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
