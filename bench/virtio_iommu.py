"""virtio-iommu bench: MAP+UNMAP requests per second issued by a guest.

The payload ``virtio_iommu_bench`` (guest_images/virtio_iommu_bench.c) makes 64 requests
available per QueueNotify -- a batch of 64 MAPs of 4 KiB pages, then a batch of 64 UNMAPs of
the same pages -- and brackets its loop with the console markers ``BENCH begin`` / ``BENCH
end``. The harness timestamps those markers as their bytes arrive (so boot is not counted)
and also times the device alone (the QueueNotify handler), to separate device cost from
vCPU exits and guest work.

Usage: python bench/virtio_iommu.py [--backend kvm|emulated|all] [--p2m direct|scattered]
Goal: >= 100,000 requests/s on KVM.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vmm.backends.kvm import kvm_usable  # noqa: E402
from vmm.machine import Machine  # noqa: E402

GOAL = 100_000


def run(backend: str, p2m: str) -> dict:
    m = Machine.from_board("rcar-virt", p2m=p2m)
    console = bytearray()
    marks: dict[str, float] = {}

    def sink(data: bytes) -> None:
        now = time.perf_counter()
        console.extend(data)
        if data.endswith(b"\n"):
            line = console[console.rfind(b"\n", 0, len(console) - 1) + 1:]
            if line.startswith(b"BENCH begin"):
                marks["begin"] = now
            elif line.startswith(b"BENCH end"):
                marks["end"] = now

    m.console_sinks.append(sink)
    backend_dev = m.devices["virtio0"].backend
    notify = backend_dev.notify
    device_time = [0.0, 0]

    def timed_notify(queue: int) -> None:
        t0 = time.perf_counter()
        notify(queue)
        device_time[0] += time.perf_counter() - t0
        device_time[1] += 1

    backend_dev.notify = timed_notify
    try:
        result = m.run("virtio_iommu_bench", backend=backend, timeout=300)
    finally:
        m.close()
    text = console.decode(errors="replace")
    found = re.search(r"BENCH requests (\d+) batch (\d+)", text)
    if result.status != 0 or not found or "begin" not in marks or "end" not in marks:
        raise SystemExit(f"{backend}: bench payload failed (status {result.status}):\n{text}")
    requests, batch = int(found.group(1)), int(found.group(2))
    wall = marks["end"] - marks["begin"]
    return {"backend": backend, "p2m": p2m, "requests": requests, "batch": batch, "seconds": wall,
            "rate": requests / wall, "device_us": device_time[0] / requests * 1e6, "kicks": device_time[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="all", choices=["all", "kvm", "emulated"])
    ap.add_argument("--p2m", default="direct", choices=["direct", "scattered"])
    args = ap.parse_args()
    ok, why = kvm_usable()
    backends = ["kvm", "emulated"] if args.backend == "all" else [args.backend]
    if "kvm" in backends and not ok:
        print(f"kvm: skipped ({why})")
        backends.remove("kvm")
    print(f"virtio-iommu MAP+UNMAP from a guest ({args.p2m} P2M), 64 requests per notification")
    print(f"{'backend':<10}{'requests':>10}{'seconds':>9}{'req/s':>11}{'device us/req':>15}  goal")
    for b in backends:
        r = run(b, args.p2m)
        verdict = "ok" if r["rate"] >= GOAL else "below"
        goal = f"{verdict} (>= {GOAL:,}/s)" if b == "kvm" else "-"
        print(f"{b:<10}{r['requests']:>10}{r['seconds']:>9.3f}{r['rate']:>11,.0f}{r['device_us']:>15.2f}  {goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
