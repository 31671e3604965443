"""How fast `vmm replay` carries out a trace, end to end, and that its memory does not grow with it.

Writes trace files of writel/readl (each with its reply line) against the sysinfo and DMA engine
registers and replays them as `vmm replay FILE` does (read_trace, a fresh machine, a streamed
replay), printing per-line figures (goal: >= 1,000,000 lines/s end to end). Two traces:

- *repetitive*: 8 distinct request lines, as register polling and recorded driver loops are;
  after the first few lines every line is a cache hit.
- *distinct*: every request line differs (readl/writel of ever new RAM addresses), so every line
  is parsed and checked strictly: the floor for traces with no repetition.

It also times the strict line parser alone (no machine), and replays the repetitive trace at two
lengths in child processes to print their peak RSS (it must not grow with the trace's length).

    PYTHONPATH=. .venv/bin/python bench/replay.py [--requests N] [--repeat R]
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

from vmm.trace import read_trace, replay_trace
from vmm.trace.language import blocks, open_text, parse_line

SYSINFO = 0x0C000000
DMA = 0x0B000000
PATTERN = [
    (f"readl {SYSINFO:#x}", "OK 0x000000004f464e49"),
    (f"writel {DMA + 0x08:#x} 0x1000", "OK"),
    (f"readl {DMA + 0x08:#x}", "OK 0x0000000000001000"),
    (f"writel {DMA + 0x1018:#x} 0x40", "OK"),
    (f"readl {DMA + 0x1000:#x}", "OK 0x0000000031414d44"),
    (f"readl {SYSINFO + 0x20:#x}", "OK 0x0000000000000001"),
    (f"writel {DMA + 0x2010:#x} 0x2000", "OK"),
    (f"readl {DMA + 0x2020:#x}", "OK 0x0000000000000000"),
]


def write_trace(path: str, requests: int, distinct: bool = False) -> int:
    """Write a trace of ``requests`` requests, two lines each; returns its size in bytes."""
    with open(path, "w") as f:
        f.write("# bench: writel/readl against sysinfo and the dma engines\n# board: rcar-virt\n")
        chunk = []
        for i in range(requests):
            if distinct:               # every line new: a writel then a readl of each RAM word
                addr = 0x100000 + 4 * (i // 2 % 0x1000000)
                req, reply = ((f"writel {addr:#x} {i:#x}", "OK") if i % 2 == 0 else
                              (f"readl {addr:#x}", f"OK {(i - 1) & 0xFFFFFFFF:#x}"))
            else:
                req, reply = PATTERN[i % len(PATTERN)]
            chunk.append(f"{req}\n{reply}\n")
            if len(chunk) >= 65536:
                f.write("".join(chunk))
                chunk = []
        f.write("".join(chunk))
    return os.path.getsize(path)


def replay_once(path: str) -> tuple[float, int]:
    """`vmm replay PATH` in this process: (seconds, lines)."""
    from vmm.trace import machine_for
    t0 = time.perf_counter()
    trace = read_trace(path)
    m = machine_for(trace)
    try:
        result = replay_trace(m, trace)
    finally:
        m.close()
    seconds = time.perf_counter() - t0
    assert result.ok, result.message
    return seconds, result.counts["lines"]


def parse_only(path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    with open_text(path) as f:
        for block in blocks(f, path):
            for line in block:
                parse_line(line)
            n += len(block)
    return time.perf_counter() - t0, n


def peak_rss_mib(path: str) -> float:
    """Peak RSS of a child process that replays ``path`` (MiB)."""
    code = ("import logging, resource, sys; logging.getLogger('vmm').setLevel(logging.ERROR);"
            "sys.path.insert(0, sys.argv[2]); import replay as b; b.replay_once(sys.argv[1]);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, path, os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("vmm").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        rep, dis, big = (os.path.join(tmp, n) for n in ("rep.qtrace", "dis.qtrace", "big.qtrace"))
        size = write_trace(rep, args.requests)
        write_trace(dis, args.requests, distinct=True)
        print(f"trace: {2 * args.requests + 2:,} lines ({args.requests:,} requests, {size / 1e6:.1f} MB)")
        t, n = min(parse_only(rep) for _ in range(args.repeat))
        print(f"strict parse alone, no cache: {t:6.3f} s  {n / t:12,.0f} lines/s  {1e6 * t / n:6.3f} us/line")
        for label, path in (("repetitive", rep), ("distinct", dis)):
            t, n = min(replay_once(path) for _ in range(args.repeat))
            goal = "   (goal 1,000,000)" if label == "repetitive" else ""
            print(f"end to end, {label:10}: {t:6.3f} s  {n / t:12,.0f} lines/s  {1e6 * t / n:6.3f} us/line{goal}")
        write_trace(big, 4 * args.requests)
        small_rss, big_rss = peak_rss_mib(rep), peak_rss_mib(big)
        print(f"peak RSS: {small_rss:7.1f} MiB for {2 * args.requests:,} lines, {big_rss:7.1f} MiB for "
              f"{8 * args.requests:,} lines (ratio {big_rss / small_rss:.2f}; goal: no growth)")


if __name__ == "__main__":
    main()
