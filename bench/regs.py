"""Cost of one register access, called straight on the four register-file devices.

Times ``dev.read(off, size)`` / ``dev.write(off, size, value)`` on the IPMMU (root and a cache),
a virtio-mmio transport, a dma engine and sysinfo of the default board, next to a floor: the
same call on a trivial device that returns a constant. The harness's per-access cost above the
bus is this call, so it shows whether the register declarations keep the access path at one
table lookup.

    PYTHONPATH=$PWD python bench/regs.py                   # this tree: ns per call, ratio to the floor
    PYTHONPATH=$PWD python bench/regs.py --against REV     # and the devices/ of git REV, side by side

With ``--against``, ``devices/`` of REV is exported to a temporary directory and measured in a
child process (same board, same calls), alternating with this tree for ``--rounds`` rounds and
keeping each case's best, so both columns come from one run under the same load.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUMBER = 100_000
REPEAT = 5

# (label, device, offset, size, value); value None = a read
CASES = [
    ("sysinfo read FLAGS", "sysinfo", 0x20, 4, None),
    ("sysinfo read RAM_SIZE (8)", "sysinfo", 0x08, 8, None),
    ("sysinfo read RAM_SIZE high half", "sysinfo", 0x0C, 4, None),
    ("dma read STATUS", "dma0", 0x20, 4, None),
    ("dma read FAULT_ADDR (8)", "dma0", 0x28, 8, None),
    ("dma write LEN", "dma0", 0x18, 4, 0x100),
    ("dma write SRC high half", "dma0", 0x0C, 4, 0),
    ("dma write IRQ_STATUS 0", "dma0", 0x34, 4, 0),
    ("virtio read MagicValue", "virtio0", 0x000, 4, None),
    ("virtio read Status", "virtio0", 0x070, 4, None),
    ("virtio read QueueNum", "virtio0", 0x038, 4, None),
    ("virtio read DeviceFeatures", "virtio0", 0x010, 4, None),
    ("virtio write QueueSel", "virtio0", 0x030, 4, 0),
    ("virtio write DeviceFeaturesSel", "virtio0", 0x014, 4, 1),
    ("virtio read empty slot", "virtio1", 0x000, 4, None),
    ("ipmmu root read IMCTR(0)", "ipmmu_mm", 0x000, 4, None),
    ("ipmmu root write IMMAIR0(1)", "ipmmu_mm", 0x068, 4, 0x44),
    ("ipmmu root write IMTTBCR(1)", "ipmmu_mm", 0x048, 4, 0x80000080),
    ("ipmmu cache read IMSTR(1)", "ipmmu_ds1", 0x060, 4, None),
    ("ipmmu cache read IMUCTR(32)", "ipmmu_ds1", 0x600, 4, None),
    ("ipmmu cache write IMUASID(32)", "ipmmu_ds1", 0x608, 4, 0),
    ("ipmmu read unnamed offset", "ipmmu_mm", 0x800, 4, None),
]


class Trivial:
    def read(self, offset: int, size: int) -> int:
        return 0x1234

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def best_ns(fn) -> float:
    """Best of REPEAT, in CPU time of this process: time spent descheduled (other jobs on a
    shared machine) does not count."""
    return min(timeit.repeat(fn, number=NUMBER, repeat=REPEAT, timer=time.process_time)) / NUMBER * 1e9


def measure() -> dict[str, float]:
    """ns per call for the floor and every case, on a fresh default board."""
    import devices
    from vmm import Machine
    m = Machine.from_board("rcar-virt")
    try:
        t = Trivial()
        out = {"devices": str(Path(devices.__file__).parent),
               "floor read": best_ns(lambda: t.read(0x20, 4)),
               "floor write": best_ns(lambda: t.write(0x20, 4, 0))}
        for label, name, off, size, value in CASES:
            dev = m.devices[name]
            if value is None:
                rd = dev.read
                out[label] = best_ns(lambda rd=rd, off=off, size=size: rd(off, size))
            else:
                wr = dev.write
                out[label] = best_ns(lambda wr=wr, off=off, size=size, value=value: wr(off, size, value))
        return out
    finally:
        m.close()


class Revision:
    """``devices/`` of git ``rev`` exported once; ``measure()`` runs the same cases in a child
    process whose path finds that copy first."""

    def __init__(self, rev: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="iommu-lab-regs-")
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "devices"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", self.tmp.name], input=archive, check=True)

    def measure(self) -> dict[str, float]:
        child = subprocess.run([sys.executable, __file__, "--json", "--devices-from", self.tmp.name],
                               check=True, capture_output=True, text=True)
        out = json.loads(child.stdout.splitlines()[-1])
        assert out["devices"] == str(Path(self.tmp.name) / "devices"), out["devices"]
        return out


def best(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: v if k == "devices" else min(a[k], v) for k, v in b.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="REV", help="also measure devices/ of this git revision")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices-from", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help="alternate this tree and REV this many times")
    args = ap.parse_args()
    if args.devices_from:                           # the child: REV's devices/ before this tree's
        sys.path.insert(0, args.devices_from)
    if args.json:
        print(json.dumps(measure()))
        return 0
    rev = Revision(args.against) if args.against else None
    now = old = None
    for _ in range(args.rounds if rev else 1):      # interleaved, best of each: load shifts hit both
        now = best(now, measure())
        if rev:
            old = best(old, rev.measure())
    floor = {"r": now["floor read"], "w": now["floor write"]}
    head = f"{'access':34} {'ns':>7} {'x floor':>8}"
    if old:
        head += f" {args.against[:10] + ' ns':>14} {'x floor':>8} {'new/old':>8}"
    print(head)
    for label in (k for k in now if k != "devices"):
        kind = "w" if "write" in label else "r"
        row = f"{label:34} {now[label]:7.0f} {now[label] / floor[kind]:8.2f}"
        if old:
            ofloor = old["floor write" if kind == "w" else "floor read"]
            row += f" {old[label]:14.0f} {old[label] / ofloor:8.2f} {now[label] / old[label]:8.2f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
