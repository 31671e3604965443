"""The guest DMA API payload (`dma_api`) and the demo's bug section on every machine DESIGN section 7
names: both backends, direct and scattered, secure or not, with RAM above 4 GiB; a secure run
recorded and replayed with no CPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import BACKENDS

from vmm import Machine
from vmm.trace import Recorder, replay_fresh

REPO = Path(__file__).resolve().parents[1]


def run(image: str, backend: str, p2m: str, secure: bool, ram: str | None = "192M"):
    with Machine.from_board("rcar-virt", p2m=p2m, ram=ram, secure=secure, quiet=True) as m:
        return m.run(image, backend=backend, timeout=60)


@pytest.mark.parametrize("secure", [False, True], ids=["normal", "secure"])
@pytest.mark.parametrize("p2m", ["direct", "scattered"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dma_api_passes(backend, p2m, secure):
    r = run("dma_api", backend, p2m, secure)
    text = r.console.decode()
    assert r.status == 0 and "FAIL" not in text, text[-3000:]
    assert "buffers above 4 GiB" in text
    bounced = "bounced+IOMMU" if secure else "IOMMU"
    for dev in ("dma0", "dma2", "dma4"):
        assert f"PASS: {dev}: 12288 bytes" in text and f"path {bounced}/{bounced}" in text
    assert "path bounced/bounced (expected bounced)" in text                # dma3 above its mask or scattered
    assert ("STATUS 7" in text) == secure and "STATUS 6, FAULT_ADDR" in text
    assert "dma_set_mask(0xfffff) refused: a 20-bit mask cannot reach the bounce pool" in text


@pytest.mark.parametrize("p2m", ["direct", "scattered"])
def test_demo_shows_one_bug_of_each_kind(p2m):
    for secure in (False, True):
        r = run("demo", "emulated", p2m, secure, ram=None)
        text = r.console.decode()
        assert r.status == 0, text[-2000:]
        assert "PASS: mask: dma3 (32 address lines)" in text
        assert ("PASS: private: dma3 given a page the guest never shared: STATUS 7" in text) == secure


def test_secure_run_records_and_replays(tmp_path):
    path = tmp_path / "dma_api_secure.qtrace"
    with Machine.from_board("rcar-virt", p2m="scattered", ram="192M", secure=True, quiet=True) as m:
        rec = Recorder(m, path)
        r = m.run("dma_api", backend="emulated", timeout=60)
        rec.close()
    assert r.status == 0
    text = path.read_text()
    assert "# secure: true" in text.splitlines()[:8]
    assert not rec.divergences
    result = replay_fresh(str(path))
    assert result.ok, result.message
    # the same trace on a machine that is not secure diverges (share answers 2): refused up front
    bad = replay_fresh(text.replace("# secure: true", "# secure: false"), name="t")
    assert not bad.ok


def test_cli_secure_flag(tmp_path):
    trace = tmp_path / "t.qtrace"
    trace.write_text("readl 0x0c000020\nOK 0x5\n")
    vmm = [sys.executable, "-m", "vmm.cli"]
    assert subprocess.run([*vmm, "replay", str(trace)], capture_output=True, cwd=REPO).returncode == 1
    assert subprocess.run([*vmm, "replay", "--secure", str(trace)], capture_output=True, cwd=REPO).returncode == 0
    trace.write_text("# secure: maybe\nreadl 0x0c000020\nOK 0x5\n")
    out = subprocess.run([*vmm, "replay", str(trace)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "neither true nor false" in out.stderr
    out = subprocess.run([*vmm, "run", "demo", "--secure", "--backend", "emulated"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "flags 0x5" in out.stdout
