"""construct layouts are compiled once and cached beside the byte code: a process that finds the
cache valid never imports construct, and an edit of the declaring module recompiles."""
from __future__ import annotations

import marshal
import os
import subprocess
import sys
import textwrap

from devices import dma_engine, virtio_iommu, virtqueue
from devices.layout import Layout

PROBE = ("import sys, mylayouts; print(mylayouts.L.fields, mylayouts.L.sizeof(), "
         "'construct' in sys.modules)")


def _run(folder, write_bytecode: bool = True) -> tuple[list, int, bool]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(folder), os.getcwd()])
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    fields, size, imported = out.stdout.rsplit(" ", 2)
    return eval(fields), int(size), imported.strip() == "True"


def test_cache_skips_construct_and_follows_the_source(tmp_path):
    mod = tmp_path / "mylayouts.py"
    mod.write_text(textwrap.dedent("""
        from devices.layout import layout

        @layout
        def L(cs):
            return cs.Struct("a" / cs.Int32ul, "_gap" / cs.Padding(4), "b" / cs.Int64ul, "c" / cs.Bytes(3))
    """))
    fields, size, imported = _run(tmp_path, write_bytecode=False)
    assert imported and size == 19 and not list((tmp_path / "__pycache__").glob("mylayouts.*.layouts"))
    assert fields == [("a", 0, 4, "L"), ("_gap", 4, 4, ""), ("b", 8, 8, "Q"), ("c", 16, 3, "")]
    assert _run(tmp_path)[2] is True                       # compiled and stored
    (cache_file,) = (tmp_path / "__pycache__").glob("mylayouts.*.layouts")
    cache = marshal.loads(cache_file.read_bytes())
    assert tuple(cache["layouts"]["L"][2]) == ("b", 8, 8, "Q")
    assert _run(tmp_path) == (fields, 19, False)           # from the cache: no construct import
    mod.write_text(mod.read_text().replace('"b" / cs.Int64ul', '"b" / cs.Int16ul'))
    for pyc in (tmp_path / "__pycache__").glob("mylayouts.*.pyc"):
        pyc.unlink()                                        # same size, same second: Python would reuse it
    fields2, size2, imported2 = _run(tmp_path)
    assert imported2 and size2 == 13 and fields2[2] == ("b", 8, 2, "H")


def test_compiled_layouts_agree_with_their_construct_declarations():
    for declared in (dma_engine.DMA_REGS, virtqueue.VRING_DESC_LAYOUT, virtio_iommu.MAP_LAYOUT,
                     virtio_iommu.CONFIG_LAYOUT, virtio_iommu.FAULT_LAYOUT):
        assert isinstance(declared, Layout)
        c = declared.construct
        assert c.sizeof() == declared.sizeof()
        offset = 0
        for sub, (name, off, size, _) in zip(c.subcons, declared.fields, strict=True):
            assert (sub.name, sub.sizeof(), offset) == (name, size, off)
            offset += size
    st, off = virtio_iommu.MAP_LAYOUT.struct()
    assert st.size == 36 and off["phys_start"] == 24
