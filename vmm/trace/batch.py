"""``vmm replay`` of many traces: in worker processes, one summary line each, a total, JUnit XML.

Each trace is replayed on its own fresh machine (built from its header and the options), in this
process or, with ``--jobs N``, in N worker processes, each building its own machines. Results are
reported in the order the traces were given. The exit status is the worst one: 2 when any trace
was malformed, unreadable or held no request, else 1 when any expectation failed, else 0.
"""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmm.explain import format_fault
from vmm.trace.language import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, Trace, TraceError, read_trace
from vmm.trace.replay import ReplayResult, machine_for, replay_trace

if TYPE_CHECKING:
    from vmm.machine import Machine


@dataclass(frozen=True)
class Options:
    board: str | None = None
    p2m: str | None = None
    ram: str | None = None
    progress: bool = False
    timeline: str | None = None       # write a Chrome trace-event timeline of the replay here
    secure: bool | None = None         # --secure: dom0 secure whatever the header says


def open_trace(path: str) -> tuple[Trace | None, str | None]:
    """(trace, None), or (None, why) in one line when the file cannot be read."""
    try:
        return read_trace(path), None
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror or e}"
    except TraceError as e:
        return None, str(e)


def build_machine(trace: Trace, board: str | None = None, p2m: str | None = None, ram: str | None = None,
                  secure: bool | None = None) -> tuple[Machine | None, str | None]:
    """(a fresh machine for the trace, None), or (None, why) in one line when its header or the
    options ask for a machine that cannot be built -- never an exception, so a bad trace fails
    alone (one test item, one line of a batch), never the session."""
    from vmm.board import BoardError
    try:
        return machine_for(trace, board, p2m, ram, secure), None
    except (BoardError, OSError, ValueError) as e:
        return None, f"{trace.name}: {e}"


def replay_path(path: str, opts: Options) -> ReplayResult:
    """Replay one trace file on a fresh machine; every failure is a result, never an exception."""
    t0 = time.perf_counter()
    trace, why = open_trace(path)
    if trace is not None:
        m, why = build_machine(trace, opts.board, opts.p2m, opts.ram, opts.secure)
    if why is not None:
        return ReplayResult(False, EXIT_ERROR, path, None, why, seconds=time.perf_counter() - t0)
    timeline = None
    if opts.timeline:
        from vmm.timeline import Timeline
        timeline = Timeline(m, opts.timeline)
    try:
        result = replay_trace(m, trace, progress=opts.progress).observe(m)
    finally:
        if timeline is not None:
            timeline.close()
        m.close()
    result.seconds = time.perf_counter() - t0
    return result


def replay_paths(paths: list[str], opts: Options, jobs: int = 1) -> Iterator[ReplayResult]:
    """Results in the order of ``paths``; with ``jobs > 1`` replayed by that many worker processes."""
    if jobs <= 1 or len(paths) <= 1:
        for p in paths:
            yield replay_path(p, opts)
        return
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(jobs, len(paths)), mp_context=ctx) as pool:
        yield from pool.map(replay_path, paths, [opts] * len(paths))


def overall_status(results: list[ReplayResult]) -> int:
    statuses = {r.status for r in results}
    if EXIT_ERROR in statuses or not results:
        return EXIT_ERROR
    return EXIT_MISMATCH if EXIT_MISMATCH in statuses else EXIT_OK


def summary_line(result: ReplayResult) -> str:
    if result.ok:
        c = result.counts
        extra = f", debug exit {result.exit_status}" if result.exit_status is not None else ""
        return (f"{result.trace}: ok: {c['requests']} requests, {c['expectations']} expectations held, "
                f"{c['irq_edges']} IRQ edges{extra} ({result.seconds:.3f} s)")
    return result.message


def total_line(results: list[ReplayResult], seconds: float) -> str:
    ok = sum(r.ok for r in results)
    failed = sum(r.status == EXIT_MISMATCH for r in results)
    errors = sum(r.status == EXIT_ERROR for r in results)
    return f"total: {len(results)} traces, {ok} passed, {failed} failed, {errors} errors ({seconds:.3f} s)"


def junit_xml(results: list[ReplayResult], seconds: float) -> bytes:
    """A JUnit XML report: one testcase per trace; a mismatch is a failure, status 2 an error."""
    suite = ET.Element("testsuite", name="vmm replay", tests=str(len(results)),
                       failures=str(sum(r.status == EXIT_MISMATCH for r in results)),
                       errors=str(sum(r.status == EXIT_ERROR for r in results)), skipped="0",
                       time=f"{seconds:.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="vmm.replay", name=r.trace, time=f"{r.seconds:.3f}")
        if not r.ok:
            tag = "failure" if r.status == EXIT_MISMATCH else "error"
            el = ET.SubElement(case, tag, message=r.message, type=f"status {r.status}")
            el.text = r.message
        else:
            ET.SubElement(case, "system-out").text = summary_line(r)
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def check_writable(path: str, what: str) -> str | None:
    """Why ``path`` cannot be written (one line), or None; creates or truncates it to find out."""
    try:
        with open(path, "wb"):
            pass
    except OSError as e:
        return f"{what} {path}: cannot write: {e.strerror or e}"
    return None


def main_replay(args) -> int:
    """``vmm replay TRACE... [--board B] [--p2m P] [--ram R] [--jobs N] [--junit FILE] [--json]``.

    Options given on the command line win over a trace's header; ``--board rcar-virt`` is also
    the default, so a header naming another board is followed unless the option names one too.
    """
    paths = list(args.trace)
    if args.junit:
        why = check_writable(args.junit, "--junit")
        if why:
            print(f"vmm: {why}", file=sys.stderr)
            return EXIT_ERROR
    board = args.board if args.board != "rcar-virt" else None
    jobs = args.jobs or 1
    if args.timeline:
        if len(paths) != 1:
            print("vmm: --timeline takes one trace", file=sys.stderr)
            return EXIT_ERROR
        why = check_writable(args.timeline, "--timeline")
        if why:
            print(f"vmm: {why}", file=sys.stderr)
            return EXIT_ERROR
    opts = Options(board, args.p2m, args.ram, secure=True if getattr(args, "secure", False) else None,
                   progress=not args.json and jobs == 1 and len(paths) == 1 and sys.stderr.isatty(),
                   timeline=args.timeline)
    t0 = time.perf_counter()
    results: list[ReplayResult] = []
    for r in replay_paths(paths, opts, jobs):
        results.append(r)
        if args.explain_faults:
            for f in r.faults:
                print(f"{r.trace}: {format_fault(f)}", file=sys.stderr)
        if args.json:
            print(json.dumps(r.as_dict()), flush=True)
        elif r.ok:
            print(summary_line(r), flush=True)
        else:
            sys.stdout.flush()
            print(r.message, file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    status = overall_status(results)
    if len(paths) > 1:
        if args.json:
            print(json.dumps({"total": len(results), "passed": sum(r.ok for r in results),
                              "failed": sum(r.status == EXIT_MISMATCH for r in results),
                              "errors": sum(r.status == EXIT_ERROR for r in results),
                              "status": status, "seconds": round(seconds, 6)}))
        else:
            print(total_line(results, seconds))
    if args.junit:
        try:
            with open(args.junit, "wb") as f:
                f.write(junit_xml(results, seconds))
        except OSError as e:
            print(f"vmm: --junit {args.junit}: cannot write: {e.strerror or e}", file=sys.stderr)
            return EXIT_ERROR
    return status
