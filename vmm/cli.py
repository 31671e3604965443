"""The ``vmm`` command: run payloads, replay traces, list boards, inspect images."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys

from vmm.backends import BackendUnavailable
from vmm.board import BoardError, describe_types, list_boards
from vmm.elfload import ImageError, describe_sections, load_image
from vmm.images import available_images, find_image
from vmm.logbudget import WarningBudget
from vmm.registry import RegistryError

EXIT_USAGE = 2
TIMEOUT_MIN, TIMEOUT_MAX = 0.01, 86400.0     # below 10 ms no backend can stop a guest in time; a day at most
JOBS_MAX = 256
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}

RUN_STATUSES = """exit status:
  V      the payload's debug-exit value (it wrote V to port 0xF4; 0 = every check passed)
  2      bad image, board or option (one line on stderr says why)
  124    the guest was stopped by --timeout
  125    the guest halted without writing the debug-exit port
  126    the guest crashed (triple fault, VM entry failure, emulator error)
  130    interrupted (Ctrl-C), or killed from an attached debugger (--gdb)
"""

REPLAY_STATUSES = """exit status (the worst over all traces given):
  0      every expectation of every trace held
  1      a mismatch: TRACE:LINE: expected ..., got ... (the first one of each failing trace)
  2      a malformed or unreadable trace, a trace that holds no request (it would check
         nothing), a request outside guest RAM and the device windows, a bad board or option
  130    interrupted (Ctrl-C)
"""


def _machine(args):
    from vmm.machine import Machine
    return Machine.from_board(args.board, p2m=args.p2m, ram=getattr(args, "ram", None),
                              secure=True if getattr(args, "secure", False) else None)


def _seconds(text: str) -> float:
    """--timeout: 0 (no limit) or a finite number of seconds in [TIMEOUT_MIN, TIMEOUT_MAX]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0 or (math.isfinite(value) and TIMEOUT_MIN <= value <= TIMEOUT_MAX):
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give 0 (no limit) or {TIMEOUT_MIN:g} to {TIMEOUT_MAX:g} seconds")


def _jobs(text: str) -> int:
    """--jobs: 1..JOBS_MAX worker processes, or 0 for one per CPU."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value == 0:
        return os.cpu_count() or 1
    if 1 <= value <= JOBS_MAX:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {JOBS_MAX} worker processes (0: one per CPU)")


def _check_record_path(path: str) -> str | None:
    """Why ``--record PATH`` cannot be written (checked before the machine is built), else None."""
    from vmm.trace.batch import check_writable
    if os.path.isdir(path):
        return f"--record {path}: is a directory (give a file name)"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"--record {path}: no such directory {parent}"
    return check_writable(path, "--record")


def cmd_run(args) -> int:
    if args.record:
        why = _check_record_path(args.record)
        if why:
            print(f"vmm: {why}", file=sys.stderr)
            return EXIT_USAGE
    if args.timeline:
        from vmm.trace.batch import check_writable
        why = check_writable(args.timeline, "--timeline")
        if why:
            print(f"vmm: {why}", file=sys.stderr)
            return EXIT_USAGE
    image = find_image(args.image)       # an unknown payload name fails here, listing the known ones
    gdb = None
    if args.gdb is not None:             # listening before the machine is built: a busy port is a usage error
        from vmm.gdbstub import GdbError, GdbServer
        try:
            gdb = GdbServer(args.gdb, wait=args.gdb_wait)
        except GdbError as e:
            print(f"vmm: {e}", file=sys.stderr)
            return EXIT_USAGE
    elif args.gdb_wait:
        print("vmm: --gdb-wait needs --gdb [HOST:]PORT", file=sys.stderr)
        return EXIT_USAGE
    m = _machine(args)
    if args.explain_faults:
        m.fault_listeners.append(lambda e: print(e.text(), file=sys.stderr, flush=True))
    timeline = None
    if args.timeline:
        from vmm.timeline import Timeline
        timeline = Timeline(m, args.timeline)
    if not args.json:
        def echo(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            if b"\n" in data:
                sys.stdout.buffer.flush()
        m.console_sinks.append(echo)
    if not args.json:
        _wire_stdin(m)
    recorder = None
    if args.record:
        from vmm.trace import Recorder
        recorder = Recorder(m, args.record, note=f"recorded from: vmm run {image} "
                            f"--backend {args.backend} --p2m {m.board.p2m}{' --secure' if m.board.secure else ''}")
    try:
        result = m.run(image, backend=args.backend, timeout=args.timeout, gdb=gdb, cmdline=args.cmdline,
                       initrd=args.initrd)
        if recorder is not None:
            recorder.close()
    except OSError as e:                 # the trace's disk filled up (or went away) during the run
        if recorder is None or e.errno not in _WRITE_ERRORS:
            raise
        print(f"vmm: --record {args.record}: cannot write: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if recorder is not None:
            try:
                recorder.close()
            except OSError:
                pass
        if timeline is not None:
            timeline.close()
    sys.stdout.flush()
    if args.json:
        print(json.dumps({"status": result.status, "reason": result.reason, "backend": result.backend,
                          "message": result.message, "console": result.console.decode("utf-8", "replace"),
                          "fault_count": m.fault_count, "faults": m.faults(),
                          "isolation_crossings": {f"{d} -> {o}": n for (d, o), n in m.crossings.items()}}))
    elif result.reason != "exit":
        print(f"vmm: {result.message}", file=sys.stderr)
    return result.status


def _wire_stdin(m) -> None:
    """Standard input goes to the board's console UART (the first device that takes ``feed``), so
    ``console=ttyS0`` gives a shell; a thread pumps it until EOF. While it can still come, a guest
    that halts with interrupts enabled waits for it instead of ending the run."""
    import threading

    uart = next((d for d in m.devices.values() if callable(getattr(d, "feed", None))), None)
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return
    if uart is None:
        return
    uart.expect_input = True

    def pump() -> None:
        try:
            while data := os.read(fd, 4096):
                uart.feed(data)
        except OSError:
            pass
        uart.expect_input = False
        uart.feed(b"")                    # wake a waiting CPU, which now sees no input can come
    threading.Thread(target=pump, name="vmm-stdin", daemon=True).start()


def cmd_replay(args) -> int:
    from vmm.trace import main_replay
    return main_replay(args)


def cmd_boards(args) -> int:
    if args.types:
        print(describe_types())
        return 0
    for b in list_boards():
        print(f"{b.name:12} {b.description}")
    return 0


def cmd_info(args) -> int:
    """``vmm info IMAGE``: what the loader sees in an ELF; ``vmm info --board B``: the machine's
    address map and DMA topology (QEMU's ``info mtree``), ``--json`` for tools."""
    if args.image is not None:
        from vmm.board import load_board
        from vmm.machine import ram_ranges
        board = load_board(args.board)
        img = load_image(find_image(args.image), ram_ranges(board.ram))
        print(img.describe())
        print("\n".join(describe_sections(img.path, img.entry)))
        return 0
    from vmm.machine import Machine
    from vmm.mapinfo import format_map, machine_map
    with Machine.from_board(args.board, p2m=args.p2m, ram=args.ram, cpu=False, quiet=True) as m:
        info = machine_map(m)
    print(json.dumps(info, indent=1) if args.json else format_map(info))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmm", description="iommu-lab: boot payloads and replay MMIO traces "
                                "against IOMMU device models")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="boot a PVH payload (default: demo)", epilog=RUN_STATUSES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("image", nargs="?", default=None,
                   help=f"ELF or bzImage path, or built payload name ({', '.join(available_images()) or 'none built'})")
    r.add_argument("--backend", choices=["auto", "kvm", "emulated"], default="auto")
    r.add_argument("--cmdline", default="", metavar="STR",
                   help="the kernel command line, handed over in hvm_start_info (e.g. \"console=ttyS0\")")
    r.add_argument("--initrd", default=None, metavar="FILE",
                   help="an initramfs, handed over as hvm_start_info module 0")
    r.add_argument("--board", default="rcar-virt")
    r.add_argument("--p2m", choices=["direct", "scattered"], default=None)
    r.add_argument("--ram", default=None, help="guest RAM size, e.g. 256M")
    r.add_argument("--secure", action="store_true",
                   help="a secure guest: devices may touch only the pages it shares through hyp (DESIGN section 7)")
    r.add_argument("--timeout", type=_seconds, default=10.0,
                   help=f"seconds before a runaway guest is stopped, {TIMEOUT_MIN:g} to {TIMEOUT_MAX:g} "
                        "(0: no limit; default 10)")
    r.add_argument("--record", metavar="TRACE", help="write a replayable qtest-language trace of the run")
    r.add_argument("--json", action="store_true", help="print a JSON summary instead of streaming the console")
    r.add_argument("--explain-faults", action="store_true",
                   help="print every DMA fault to stderr with the walk that failed, level by level")
    r.add_argument("--timeline", metavar="FILE",
                   help="write a Chrome Trace Event timeline (Perfetto, chrome://tracing) of the run")
    r.add_argument("--gdb", metavar="[HOST:]PORT", help="serve the GDB remote protocol on HOST (default "
                   "127.0.0.1) PORT (0: any free one, logged): `target remote HOST:PORT`")
    r.add_argument("--gdb-wait", action="store_true",
                   help="with --gdb: hold the guest at its entry point until a debugger attaches")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("replay", help="replay qtest-language MMIO traces with no CPU", epilog=REPLAY_STATUSES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Replay each trace on a fresh machine built from its header (# board:, "
                                   "# p2m:, # ram:, # secure:) and the options, which win over the header. Prints one "
                                   "line per trace (ok lines on stdout, failures on stderr) and, for several "
                                   "traces, a total.")
    t.add_argument("trace", nargs="+", help="trace files (qtest language or QEMU -qtest-log)")
    t.add_argument("--board", default="rcar-virt")
    t.add_argument("--p2m", choices=["direct", "scattered"], default=None)
    t.add_argument("--ram", default=None, help="guest RAM size, e.g. 256M (overrides the header's # ram:)")
    t.add_argument("--secure", action="store_true", help="a secure dom0 (overrides the header's # secure:)")
    t.add_argument("-j", "--jobs", type=_jobs, default=1, metavar="N",
                   help="replay in N worker processes, each building its own machines (0: one per CPU)")
    t.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report (one testcase per trace)")
    t.add_argument("--json", action="store_true", help="print one JSON summary line per trace (and a total)")
    t.add_argument("--explain-faults", action="store_true",
                   help="print every DMA fault to stderr with the walk that failed, level by level")
    t.add_argument("--timeline", metavar="FILE",
                   help="write a Chrome Trace Event timeline of the replay (one trace only)")
    t.set_defaults(func=cmd_replay)

    b = sub.add_parser("boards", help="list boards")
    b.add_argument("--types", action="store_true", help="list every registered device type with its board keys")
    b.set_defaults(func=cmd_boards)

    i = sub.add_parser("info", help="what the loader sees in an ELF, or (no IMAGE) the board's map and DMA "
                       "topology")
    i.add_argument("image", nargs="?", default=None)
    i.add_argument("--board", default="rcar-virt")
    i.add_argument("--p2m", choices=["direct", "scattered"], default=None)
    i.add_argument("--ram", default=None, help="guest RAM size, e.g. 256M")
    i.add_argument("--json", action="store_true", help="the map as JSON")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The harness's own log goes to stderr through one handler of this call's, whose budget shows
    # each kind of warning a few times and summarises the rest at the end.
    budget = WarningBudget()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vmm: %(message)s"))
    handler.addFilter(budget)
    vlog = logging.getLogger("vmm")
    saved = vlog.level, vlog.propagate
    vlog.addHandler(handler)
    vlog.propagate = False
    vlog.setLevel(logging.INFO if args.verbose or args.cmd == "run" else logging.WARNING)
    try:
        return args.func(args)
    except (ImageError, BoardError, BackendUnavailable, RegistryError) as e:
        print(f"vmm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                 # `vmm boards --types | head`
        sys.stderr.close()
        return 0
    finally:
        for line in budget.summary():
            print(f"vmm: {line}", file=sys.stderr)
        vlog.removeHandler(handler)
        vlog.level, vlog.propagate = saved


if __name__ == "__main__":
    sys.exit(main())
