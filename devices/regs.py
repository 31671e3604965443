"""Registers declared once, with their behaviour (QEMU ``REG32``/``FIELD``, Renode ``Define`` style).

The layout -- every register's offset and width -- is declared once, as a ``construct.Struct``
of fixed-size little-endian fields (names starting with ``_`` are gaps), through
``devices.layout.layout`` (compiled once and cached: running needs no ``construct`` import).
A ``Reg`` adds what the register *does*: its name and explicit offset, width, access, reset value, named bit fields
and optional hooks. ``Bank`` pairs a layout with its ``Reg`` declarations, checks at import time
that they agree (same names, offsets and widths), and compiles them into a dict keyed by
``(offset, access size)``: a bus access costs one dict lookup and never a ``construct`` parse.
8-byte registers also answer 4-byte accesses to either half (low half at the lower address), as
32-bit code needs.

Access kinds (what a write does to the stored value; reads return it unless noted):

- ``RW``: latch the written bits;        ``RO``: ignore writes;
- ``WO``: latch, but reads return 0;     ``W1C`` / ``W0C``: clear the bits written as 1 / as 0.

``wmask`` limits the bits a write may change (the others keep their value), ``self_clearing``
names fields that read 0 once the write completes (FLUSH, RUN: the hook still sees them set).

Hooks are the side effects. Each is a method name of the device that owns the register (bound
once per device, so a declaration module needs no import of the device) or a function taking the
device first. ``on_write(old, value)`` runs after the new value is stored (``value`` is the whole
register as written, ``old`` what it held before); ``on_read()`` returns the value a register that
mirrors device state reads. A bank repeated in a window (IPMMU contexts, uTLBs) passes the
repetition's index first. ``RegisterFile`` is the state of one bank in one device.

    @layout
    def REGS(cs):
        return cs.Struct("ID" / cs.Int32ul, "CTRL" / cs.Int32ul)

    BANK = Bank(REGS, [
        Reg("ID", 0x0, access=RO, reset=0x31414D44),
        Reg("CTRL", 0x4, fields={"RUN": 0, "MODE": (4, 2)}, self_clearing=["RUN"], on_write="_go"),
    ])
    CTRL = BANK["CTRL"]
    CTRL.MODE(0x20) == 2;  CTRL.MODE.mask == 0x30;  CTRL.MODE.encode(3) == 0x30
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from devices.layout import Layout, of_construct

RW, RO, WO, W1C, W0C = "RW", "RO", "WO", "W1C", "W0C"
ACCESS = (RW, RO, WO, W1C, W0C)

Hook = str | Callable[..., int | None] | None


class LayoutError(Exception):
    """A register declaration disagrees with the construct layout (raised at import time)."""


class Field:
    """A named bit field: ``field(value)`` extracts it from a register value, ``field.mask`` is
    its bits, ``field.encode(x)`` the register bits that hold ``x``."""

    __slots__ = ("name", "shift", "width", "mask", "max")

    def __init__(self, name: str, shift: int, width: int = 1) -> None:
        self.name = name
        self.shift = shift
        self.width = width
        self.max = (1 << width) - 1
        self.mask = self.max << shift

    def __call__(self, value: int) -> int:
        return (value >> self.shift) & self.max

    def encode(self, x: int) -> int:
        """The register bits that hold ``x`` in this field: its low ``width`` bits, as a
        register latches them (QEMU's ``FIELD_DP32`` into 0)."""
        return (x & self.max) << self.shift

    def __repr__(self) -> str:
        return f"Field({self.name}, shift={self.shift}, width={self.width})"


class Reg:
    """One register's declaration. Its fields are attributes: ``IMTTBCR.TSZ0(value)``.

    ``meta`` keeps whatever else a device wants to say about the register (the IPMMU's
    ``holder``: which instance the register matters in)."""

    def __init__(self, name: str, offset: int, *, width: int = 4, access: str = RW, reset: int = 0,
                 fields: Mapping[str, int | tuple[int, int]] | None = None,
                 self_clearing: Iterable[str] = (), wmask: int | None = None,
                 on_read: Hook = None, on_write: Hook = None, doc: str = "", **meta: object) -> None:
        if width not in (1, 2, 4, 8):
            raise LayoutError(f"{name}: width {width} is not 1, 2, 4 or 8 bytes")
        if access not in ACCESS:
            raise LayoutError(f"{name}: access {access!r} is not one of {', '.join(ACCESS)}")
        ones = (1 << (8 * width)) - 1
        self.name = name
        self.offset = offset
        self.width = width
        self.access = access
        self.doc = doc
        self.meta = meta
        self.on_read = on_read
        self.on_write = on_write
        self.fields: dict[str, Field] = {}
        for fname, spec in (fields or {}).items():
            shift, fwidth = (spec, 1) if isinstance(spec, int) else spec
            f = Field(fname, shift, fwidth)
            if shift < 0 or fwidth < 1 or f.mask & ~ones:
                raise LayoutError(f"{name}.{fname}: bits {shift}+{fwidth} are outside a {width}-byte register")
            for other in self.fields.values():
                # a field may lie strictly inside another (a narrower view of it), never astride one
                inside = (f.mask & other.mask) in (f.mask, other.mask) and f.mask != other.mask
                if f.mask & other.mask and not inside:
                    raise LayoutError(f"{name}.{fname} overlaps {name}.{other.name}")
            if not fname.isupper() or hasattr(self, fname):
                raise LayoutError(f"{name}.{fname}: field names are upper case and not a Reg attribute")
            self.fields[fname] = f
            setattr(self, fname, f)
        self.sc_mask = 0
        for fname in self_clearing:
            if fname not in self.fields:
                raise LayoutError(f"{name}: self-clearing {fname} is not a field")
            self.sc_mask |= self.fields[fname].mask
        self.wmask = ones if wmask is None else wmask
        if self.wmask & ~ones or reset & ~ones or reset < 0:
            raise LayoutError(f"{name}: wmask or reset value wider than {width} bytes")
        self.reset = reset
        # a plain latch stores what is written: the access paths skip ``written`` for it
        self.latch = access in (RW, WO) and self.wmask == ones and not self.sc_mask

    def written(self, old: int, value: int) -> int:
        """What the register holds after ``value`` is written over ``old`` (before any hook)."""
        access, wmask = self.access, self.wmask
        if access == RW or access == WO:
            new = (old & ~wmask) | (value & wmask)
        elif access == W1C:
            new = old & ~(value & wmask)
        elif access == W0C:
            new = old & (value | ~wmask)
        else:
            return old
        return new & ~self.sc_mask

    def decode(self, value: int) -> dict[str, int]:
        """Every field of ``value`` by name (for logs, traces and tests)."""
        return {name: f(value) for name, f in self.fields.items()}

    def __repr__(self) -> str:
        return f"Reg({self.name}, {self.offset:#x}, width={self.width}, {self.access})"


def layout_fields(layout: Layout | Any) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of every named field of a flat layout (or construct.Struct)."""
    return (layout if isinstance(layout, Layout) else of_construct(layout)).named()


class Bank:
    """A register block: a construct layout and the ``Reg`` declarations checked against it."""

    def __init__(self, layout: Layout | Any, regs: Iterable[Reg], name: str = "") -> None:
        if not isinstance(layout, Layout):
            layout = of_construct(layout, name)       # a construct.Struct built in place
        self.layout = layout
        self.name = name
        self.size = layout.sizeof()
        self.regs: dict[str, Reg] = {}
        where = f"{name}: " if name else ""
        declared = layout_fields(layout)
        for reg in regs:
            if reg.name in self.regs:
                raise LayoutError(f"{where}{reg.name} is declared twice")
            if reg.name not in declared:
                raise LayoutError(f"{where}{reg.name} is declared but not in the layout")
            offset, size = declared[reg.name]
            if (reg.offset, reg.width) != (offset, size):
                raise LayoutError(f"{where}{reg.name} is declared at {reg.offset:#x} ({reg.width} bytes); "
                                  f"the layout has it at {offset:#x} ({size} bytes)")
            self.regs[reg.name] = reg
        missing = sorted(set(declared) - set(self.regs))
        if missing:
            raise LayoutError(f"{where}layout registers without a declaration: {', '.join(missing)}")
        # (offset, access size) -> (register, bit shift of the accessed bytes in the register)
        self.accesses: dict[tuple[int, int], tuple[Reg, int]] = {}
        for reg in self.regs.values():
            self.accesses[(reg.offset, reg.width)] = (reg, 0)
            if reg.width == 8:
                self.accesses[(reg.offset + 4, 4)] = (reg, 32)
                self.accesses[(reg.offset, 4)] = (reg, 0)

    def __getitem__(self, name: str) -> Reg:
        return self.regs[name]

    def __iter__(self) -> Iterator[Reg]:
        return iter(self.regs.values())

    def __contains__(self, name: object) -> bool:
        return name in self.regs

    def offset(self, name: str) -> int:
        return self.regs[name].offset

    def constants(self) -> dict[tuple[int, int], int]:
        """(offset, size) -> value of the registers whose value is fixed by the declaration alone
        (read-only, no read hook): what a device with nothing behind it reads."""
        return {key: (reg.reset >> shift) & ((1 << (8 * key[1])) - 1)
                for key, (reg, shift) in self.accesses.items()
                if reg.access == RO and reg.on_read is None}

    def build(self, values: Mapping[str, int]) -> bytes:
        """The register block as bytes, unnamed registers at their reset value (tests, docs)."""
        return self.layout.construct.build({r.name: values.get(r.name, r.reset) for r in self})


def bind(owner: object, hook: Hook, *args: object) -> Callable[..., int | None] | None:
    """A declared hook bound to the device that owns the register (and a bank index)."""
    if hook is None:
        return None
    if isinstance(hook, str):
        method = getattr(owner, hook, None)
        if method is None:
            raise LayoutError(f"{type(owner).__name__} has no register hook {hook}")
        return functools.partial(method, *args) if args else method
    return functools.partial(hook, owner, *args)


def merge(old: int, value: int, shift: int, access_size: int) -> int:
    """Store ``value`` into the ``access_size`` bytes of ``old`` that start at bit ``shift``."""
    mask = ((1 << (access_size * 8)) - 1) << shift
    return (old & ~mask) | ((value << shift) & mask)


def _nothing(offset: int, size: int, value: int = 0) -> int:
    return 0


class RegisterFile(dict):
    """One device's registers of one bank: name -> value, and the bus face that applies the
    declared behaviour. ``values`` override reset values (per-device constants). An access no
    register claims goes to ``unmatched_read(offset, size)`` / ``unmatched_write(offset, size,
    value)`` (owner method names: a region beyond the registers, like virtio's config space);
    by default it reads 0 and a write is dropped.

    A device may hand ``read``/``write`` to the bus as they are: each access is one call, one
    lookup (keyed ``size << 32 | offset``: offsets inside a window are below 4 GiB)."""

    __slots__ = ("bank", "_initial", "_rd", "_wr", "_unmatched_read", "_unmatched_write")

    def __init__(self, bank: Bank, owner: object = None, *, unmatched_read: Hook = None,
                 unmatched_write: Hook = None, **values: int) -> None:
        super().__init__((reg.name, reg.reset) for reg in bank)
        for name, value in values.items():
            if name not in bank:
                raise KeyError(f"{bank.name or 'bank'} has no register {name}")
            self[name] = value
        self.bank = bank
        self._initial = dict(self)
        self._unmatched_read = bind(owner, unmatched_read) or _nothing
        self._unmatched_write = bind(owner, unmatched_write) or _nothing
        # One table per direction; an entry is the cheapest thing that does the access: a plain
        # register accessed whole is just its name, a read hook is the bound hook, the rest a
        # tuple. A write-only register is absent from the read table (reads 0), a read-only one
        # without a hook from the write table (writes are dropped).
        self._rd: dict[int, str | Callable | tuple] = {}
        self._wr: dict[int, str | tuple] = {}
        for (offset, size), (reg, shift) in bank.accesses.items():
            key = size << 32 | offset
            hook = bind(owner, reg.on_read)
            if reg.access != WO:
                if size == reg.width:
                    self._rd[key] = reg.name if hook is None else hook
                else:
                    self._rd[key] = (reg.name, shift, (1 << (8 * size)) - 1, hook)
            hook = bind(owner, reg.on_write)
            if reg.latch and hook is None and size == reg.width:
                self._wr[key] = reg.name
            elif reg.access != RO or hook is not None:
                self._wr[key] = (reg.name, reg.width, shift, None if reg.latch else reg.written, hook)

    def reset(self) -> None:
        """Every register back to the value it was created with (a device reset)."""
        self.update(self._initial)

    def read(self, offset: int, size: int) -> int:
        """The bytes an access at (offset, size) sees; 0 for anything that is not a readable
        register or register half (unless ``unmatched_read`` says otherwise)."""
        hit = self._rd.get(size << 32 | offset)
        if hit.__class__ is str:                    # most reads: a register, whole
            return self[hit]
        if hit is None:
            return self._unmatched_read(offset, size)
        if hit.__class__ is tuple:                  # half of an 8-byte register
            name, shift, mask, hook = hit
            return ((self[name] if hook is None else hook()) >> shift) & mask
        return hit()                                # a register that mirrors device state

    def write(self, offset: int, size: int, value: int) -> None:
        hit = self._wr.get(size << 32 | offset)
        if hit.__class__ is str:                    # a plain latch, written whole
            self[hit] = value
            return
        if hit is None:
            self._unmatched_write(offset, size, value)
            return
        name, width, shift, apply, hook = hit
        old = self[name]
        if size != width:
            value = merge(old, value, shift, size)
        self[name] = value if apply is None else apply(old, value)
        if hook is not None:
            hook(old, value)
