"""Timelines: ``--timeline FILE`` writes Chrome Trace Event JSON with a track per device."""
from __future__ import annotations

import json
import subprocess
import sys


def _load(path) -> tuple[dict[int, str], list[dict]]:
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ns"
    events = data["traceEvents"]
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    return tracks, [e for e in events if e["ph"] != "M"]


def test_demo_timeline_has_every_device(tmp_path):
    out = tmp_path / "demo.json"
    res = subprocess.run([sys.executable, "-m", "vmm", "run", "demo", "--backend", "emulated", "--timeline", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    tracks, events = _load(out)
    for e in events:
        assert e["pid"] == 1 and e["ts"] >= 0 and e["ph"] in ("X", "i") and e["tid"] in tracks
    by_track: dict[str, set] = {}
    for e in events:
        by_track.setdefault(tracks[e["tid"]], set()).add(e.get("cat"))
    assert {"mmio_read", "mmio_write", "fault", "irq"} <= by_track["ipmmu_mm"]
    assert {"mmio_write", "dma"} <= by_track["dma4"] and {"mmio_write", "dma"} <= by_track["dma2"]
    assert {"mmio_write", "irq", "dma"} <= by_track["virtio0"]
    assert "mmio_read" in by_track["sysinfo"] and "console" in by_track["console"]
    # a copy: the CTRL write that ran it carries the IOTLB counters, the transfer its bytes and pages
    copy = next(e for e in events if e.get("cat") == "dma" and tracks[e["tid"]] == "dma4")
    assert copy["args"]["bytes"] > 0 and copy["args"]["pages"] >= 1 and copy["args"]["runs"] >= 1
    assert any("iotlb_misses" in e["args"] for e in events if e.get("cat") == "mmio_write")
    assert any(e["name"].startswith("fault ") and e["args"]["iova"] for e in events if e.get("cat") == "fault")
    lines = [e["name"] for e in events if e.get("cat") == "console"]
    assert any("iommu-lab" in ln for ln in lines)
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts) or max(a - b for a, b in zip(ts, ts[1:], strict=False)) < 1e6


def test_replay_timeline(tmp_path):
    out = tmp_path / "t.json"
    res = subprocess.run([sys.executable, "-m", "vmm", "replay", "tests/traces/dma_engines.qtrace",
                          "--timeline", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    tracks, events = _load(out)
    assert {"dma0", "dma3"} <= set(tracks.values())
    assert sum(e.get("cat") == "dma" for e in events) >= 2
    two = subprocess.run([sys.executable, "-m", "vmm", "replay", "tests/traces/dma_engines.qtrace",
                          "tests/traces/dma_engines.qtrace", "--timeline", str(out)], capture_output=True, text=True)
    assert two.returncode == 2 and "one trace" in two.stderr
