"""``construct`` layouts declared once and compiled once, not once per process.

Register blocks, virtqueue structures and virtio-iommu requests are declared as flat
``construct.Struct``s: the one place their offsets and widths are written down. The access paths
need only what such a declaration compiles to (each field's name, offset, size and ``struct``
format), and importing ``construct`` costs a tenth of a command's start-up. So a declaration is
a factory that receives the ``construct`` module::

    @layout
    def DMA_REGS(cs):
        return cs.Struct("ID" / cs.Int32ul, "_pad" / cs.Padding(4), "SRC" / cs.Int64ul)

and the compiled fields are kept beside the module's byte code (``__pycache__``), keyed by its source's
modification time and size, exactly as Python keeps ``.pyc`` files: a process that finds them valid never
imports ``construct``; one that does not compiles and stores them (unless byte-code writing is
off). ``.construct`` still gives the full declaration (tests, documentation, ``build``).
"""
from __future__ import annotations

import marshal
import os
import struct
import sys
from collections.abc import Callable
from typing import Any

Field = tuple[str, int, int, str]      # name, offset, size, struct format ("" for padding/bytes)

_CACHES: dict[str, tuple[str, dict[str, list], str | None]] = {}     # module -> (source hash, layouts, file)
_FORMAT = 2                          # bump when what a cache file holds changes


def _module_cache(module: str) -> tuple[str, dict[str, list], str | None]:
    hit = _CACHES.get(module)
    if hit is not None:
        return hit
    mod = sys.modules.get(module)
    source = getattr(mod, "__file__", None)
    digest, layouts, path = "", {}, None
    if source and os.path.isfile(source):
        st = os.stat(source)
        digest = f"{st.st_mtime_ns}:{st.st_size}"
        folder = os.path.join(os.path.dirname(source), "__pycache__")
        tag = sys.implementation.cache_tag or "py"
        path = os.path.join(folder, f"{module.rsplit('.', 1)[-1]}.{tag}.layouts")
        try:
            with open(path, "rb") as f:
                data = marshal.load(f)
            if isinstance(data, dict) and data.get("source") == digest and data.get("format") == _FORMAT \
                    and isinstance(data.get("layouts"), dict):
                layouts = data["layouts"]
        except (OSError, ValueError, EOFError, TypeError):
            pass
    _CACHES[module] = (digest, layouts, path)
    return _CACHES[module]


def _store(module: str) -> None:
    digest, layouts, path = _CACHES[module]
    if path is None or sys.dont_write_bytecode:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            marshal.dump({"format": _FORMAT, "source": digest, "layouts": layouts}, f)
        os.replace(tmp, path)
    except OSError:
        pass                                # a read-only install: compile again next time


def _flatten(struct_: Any) -> list[Field]:
    fields: list[Field] = []
    offset = 0
    for sub in struct_.subcons:
        size = sub.sizeof()
        name = sub.name or "_"
        fmt = getattr(getattr(sub, "subcon", sub), "fmtstr", None) or ""
        fields.append((name, offset, size, "" if name.startswith("_") else fmt.lstrip("<>=!")))
        offset += size
    return fields


class Layout:
    """A flat layout: its fields in order, and (on demand) the construct declaration itself."""

    def __init__(self, name: str, fields: list[Field], factory: Callable[[Any], Any]) -> None:
        self.name = name
        self.fields = [tuple(f) for f in fields]
        self._factory = factory
        self._construct = None

    @property
    def construct(self):
        if self._construct is None:
            import construct
            self._construct = self._factory(construct)
        return self._construct

    def sizeof(self) -> int:
        return sum(f[2] for f in self.fields)

    def named(self) -> dict[str, tuple[int, int]]:
        """name -> (offset, size) of every named field (padding starts with ``_``)."""
        return {name: (off, size) for name, off, size, _ in self.fields if not name.startswith("_")}

    def struct(self) -> tuple[struct.Struct, dict[str, int]]:
        """A ``struct.Struct`` packing the whole layout (padding as ``x``, byte strings as ``s``),
        and each field's offset: what hot code uses instead of a construct parse."""
        fmt = "<"
        offsets: dict[str, int] = {}
        for name, off, size, code in self.fields:
            if name.startswith("_"):
                fmt += f"{size}x"
            elif code:
                fmt += code
            else:
                fmt += f"{size}s"
            offsets[name] = off
        compiled = struct.Struct(fmt)
        assert compiled.size == self.sizeof(), (self.name, fmt)
        return compiled, offsets


def of_construct(declaration: Any, name: str = "") -> Layout:
    """A Layout for a ``construct.Struct`` built in place (tests, one-off declarations)."""
    out = Layout(name, _flatten(declaration), lambda cs: declaration)
    out._construct = declaration
    return out


def layout(factory: Callable[[Any], Any]) -> Layout:
    """Declare a flat layout with a factory ``factory(construct_module) -> construct.Struct``."""
    module, key = factory.__module__, factory.__qualname__
    _, layouts, _ = _module_cache(module)
    fields = layouts.get(key)
    if fields is None:
        import construct
        built = factory(construct)
        fields = _flatten(built)
        layouts[key] = fields
        _store(module)
        out = Layout(key, fields, factory)
        out._construct = built
        return out
    return Layout(key, fields, factory)
