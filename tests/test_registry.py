"""The device registry and board validation: typos and dangling references fail loudly, with one
line naming the file, the device and the key; plugins load through the entry-point group."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.board import BoardError, load_board, parse_board
from vmm.registry import REGISTRY, DeviceType, Key, Registry, RegistryError

PLUGIN = Path(__file__).parent / "plugins" / "iommu_lab_fill"


def _board(*devices: dict) -> dict:
    return {"name": "t", "device": [{"type": "sysinfo", "name": "sysinfo", "base": 0x0C000000},
                                    {"type": "ipmmu", "name": "ipmmu_mm", "base": 0xE67B0000, "irq": 0},
                                    {"type": "ipmmu", "name": "ipmmu_ds1", "base": 0xE7740000, "role": "cache",
                                     "root": "ipmmu_mm"}, *devices]}


@pytest.mark.parametrize("entry, message", [
    # the typo board: without the schema this master would silently bypass every IOMMU
    ({"iomu": "ipmmu_ds1"}, "t.toml: device 'dma0': unknown key 'iomu' (did you mean 'iommu'?)"),
    ({"mastr": 32}, "t.toml: device 'dma0': unknown key 'mastr' (did you mean 'master'?)"),
    ({"irq": None}, "t.toml: device 'dma0' needs a value for 'irq'"),
    ({"irq": "eight"}, "t.toml: device 'dma0': key 'irq' must be an integer, not 'eight'"),
    ({"irq": True}, "t.toml: device 'dma0': key 'irq' must be an integer, not True"),
    ({"iommu": "ipmmu_dsl"}, "t.toml: device 'dma0': key 'iommu' names unknown IOMMU 'ipmmu_dsl' "
                             "(did you mean 'ipmmu_ds1'?)"),
    ({"domain": "dom7"}, "t.toml: device 'dma0': key 'domain' names unknown domain 'dom7'"),
])
def test_broken_boards_fail_with_one_line(entry, message):
    dev = {"type": "dma", "name": "dma0", "base": 0x0B000000, "irq": 8, **entry}
    dev = {k: v for k, v in dev.items() if v is not None}
    with pytest.raises(BoardError) as e:
        parse_board(_board(dev), "t.toml")
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_type_and_backend_suggest_the_closest():
    with pytest.raises(BoardError, match=r"unknown type 'ipmu' \(did you mean 'ipmmu'\?\)"):
        parse_board(_board({"type": "ipmu", "name": "x", "base": 0}), "t.toml")
    with pytest.raises(BoardError, match=r"key 'backend' names unknown virtio-mmio backend 'virtio-iomu' "
                                         r"\(did you mean 'virtio-iommu'\?\)"):
        parse_board(_board({"type": "virtio-mmio", "name": "v", "base": 0x0A000000, "irq": 16,
                            "backend": "virtio-iomu"}), "t.toml")


def test_backend_keys_are_accepted_only_with_their_backend():
    spec = parse_board(_board({"type": "virtio-mmio", "name": "v", "base": 0x0A000000, "irq": 16,
                               "backend": "virtio-iommu", "endpoints": [2]}), "t.toml")
    assert spec.devices[-1]["max_mappings"] == 1_000_000          # the backend's default is filled in
    with pytest.raises(BoardError, match="unknown key 'endpoints'"):
        parse_board(_board({"type": "virtio-mmio", "name": "v", "base": 0x0A000000, "irq": 16,
                            "endpoints": [2]}), "t.toml")
    with pytest.raises(BoardError, match=r"key 'endpoints' must be a list of integers"):
        parse_board(_board({"type": "virtio-mmio", "name": "v", "base": 0x0A000000, "irq": 16,
                            "backend": "virtio-iommu", "endpoints": ["two"]}), "t.toml")


def test_choices_are_enforced():
    with pytest.raises(BoardError, match="key 'role' must be one of 'root', 'cache', not 'leaf'"):
        parse_board(_board({"type": "ipmmu", "name": "x", "base": 0xE6740000, "role": "leaf"}), "t.toml")


def test_the_default_board_validates_and_names_every_type():
    spec = load_board("rcar-virt")
    assert {d["type"] for d in spec.devices} <= set(REGISTRY.names())
    masters = [d["name"] for d in spec.devices if REGISTRY.get(d["type"]).master]
    assert masters == ["dma0", "dma1", "dma2", "dma3", "dma4"]


def test_importing_the_machine_imports_no_device_module():
    code = "import sys, vmm.machine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'devices'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_board_loads_only_the_device_modules_it_names():
    code = ("import sys\nfrom vmm.board import parse_board\n"
            "parse_board({'device': [{'type': 'const', 'name': 'c', 'base': 0}]}, 'x.toml')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'devices'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['devices', 'devices.constreg']"


def test_registering_by_hand_and_twice():
    reg = Registry(group="iommu_lab.no_such_group")
    t = DeviceType("blinker", lambda ctx, spec: (None, 4), keys=(Key("rate", int, 1),))
    reg.register(t)
    assert reg.get("blinker") is t and reg.names() == ["blinker"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(DeviceType("blinker", lambda ctx, spec: (None, 4)))


def _install_plugin(tmp_path: Path) -> Path:
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(PLUGIN)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"pip could not install the example plugin: {res.stderr.strip()[-500:]}")
    return target


def test_out_of_tree_plugin_installs_and_boots(tmp_path):
    """Install tests/plugins/iommu_lab_fill as a user would (pip, entry point), then list it, boot a
    payload on its board, and DMA through it behind an IPMMU and behind nothing."""
    site = _install_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    vmm = [sys.executable, "-m", "vmm"]
    types = subprocess.run([*vmm, "boards", "--types"], capture_output=True, text=True, env=env, timeout=60)
    assert types.returncode == 0, types.stderr
    assert "pattern-fill: bus master [iommu-lab-fill 0.1.0]" in types.stdout
    board = str(PLUGIN / "fill-board.toml")
    run = subprocess.run([*vmm, "run", "hello", "--board", board, "--backend", "emulated"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0 and "Hello from iommu-lab" in run.stdout, run.stderr
    assert "unprotected master: fill1 (master 9)" in run.stderr
    drive = f"""
from vmm.machine import Machine
m = Machine.from_board({board!r})
FILL0, FILL1, DS = 0x0B100000, 0x0B100100, 0xE7740000
def fill(base, addr, n, pattern):
    m.mmio_write(base + 0x08, 8, addr); m.mmio_write(base + 0x10, 4, n)
    m.mmio_write(base + 0x14, 4, pattern); m.mmio_write(base + 0x18, 4, 1)
    return m.mmio_read(base + 0x1C, 4)
assert m.mmio_read(FILL0, 4) == 0x4C4C4946
assert fill(FILL0, 0x2000, 10, 0xA1B2C3D4) == 0                 # uTLB 5 off: pass-through
assert m.read_guest(0x2000, 12) == bytes.fromhex('d4c3b2a1d4c3b2a1d4c30000')
m.mmio_write(DS + 0x300 + 16 * 5, 4, 1)                          # uTLB 5 on, context 0 (disabled)
assert fill(FILL0, 0x3000, 8, 0x11111111) == 2                   # translation fault
assert m.read_guest(0x3000, 8) == bytes(8)
assert fill(FILL1, 0x4000, 8, 0x22222222) == 5                   # behind no IOMMU on a 'fault' board
print('plugin ok')
"""
    res = subprocess.run([sys.executable, "-c", drive], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and "plugin ok" in res.stdout, res.stderr
