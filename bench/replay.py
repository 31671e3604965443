"""How fast `vmm replay` carries out a trace: trace lines per second (goal >= 200,000/s).

Generates a large trace of writel/readl (each with its reply line) against the sysinfo and DMA
engine registers, parses and compiles it once, then times the replay loop alone and the whole
path (parse + compile + replay), as `vmm replay` would run it.

    PYTHONPATH=. .venv/bin/python bench/replay.py [--requests N] [--repeat R]
"""
from __future__ import annotations

import argparse
import logging
import time

from vmm.machine import Machine
from vmm.trace import compile_trace, parse, replay_trace

SYSINFO = 0x0C000000
DMA = 0x0B000000


def generate(requests: int) -> str:
    """A trace of ``requests`` requests, each followed by its reply: two lines per request."""
    lines = ["# bench: writel/readl against sysinfo and the dma engines", "# board: rcar-virt"]
    pattern = [
        (f"readl {SYSINFO:#x}", "OK 0x000000004f464e49"),
        (f"writel {DMA + 0x08:#x} 0x1000", "OK"),
        (f"readl {DMA + 0x08:#x}", "OK 0x0000000000001000"),
        (f"writel {DMA + 0x1018:#x} 0x40", "OK"),
        (f"readl {DMA + 0x1000:#x}", "OK 0x0000000031414d44"),
        (f"readl {SYSINFO + 0x20:#x}", "OK 0x0000000000000001"),
        (f"writel {DMA + 0x2010:#x} 0x2000", "OK"),
        (f"readl {DMA + 0x2020:#x}", "OK 0x0000000000000000"),
    ]
    for i in range(requests):
        req, reply = pattern[i % len(pattern)]
        lines.append(req)
        lines.append(reply)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("vmm").setLevel(logging.ERROR)

    text = generate(args.requests)
    t0 = time.perf_counter()
    trace = parse(text, "bench")
    t_parse = time.perf_counter() - t0
    m = Machine.from_board("rcar-virt")
    try:
        t0 = time.perf_counter()
        ops = compile_trace(trace, m)
        t_compile = time.perf_counter() - t0
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = replay_trace(m, trace, ops=ops)
            best = min(best, time.perf_counter() - t0)
            assert result.ok, result.message
    finally:
        m.close()
    lines = trace.lines
    print(f"trace: {lines:,} lines ({len(ops):,} requests, {len(text) / 1e6:.1f} MB)")
    print(f"parse:   {t_parse:6.3f} s  {lines / t_parse:12,.0f} lines/s")
    print(f"compile: {t_compile:6.3f} s  {lines / t_compile:12,.0f} lines/s")
    print(f"replay:  {best:6.3f} s  {lines / best:12,.0f} lines/s   (best of {args.repeat}; goal 200,000)")
    total = t_parse + t_compile + best
    print(f"end to end: {total:6.3f} s  {lines / total:12,.0f} lines/s")


if __name__ == "__main__":
    main()
