"""The ``vmm`` command: run payloads, replay traces, list boards, inspect images."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from vmm.backends import BackendUnavailable
from vmm.board import BoardError, describe_types, list_boards
from vmm.elfload import ImageError, load_image
from vmm.images import available_images, find_image

EXIT_USAGE = 2


def _machine(args):
    from vmm.machine import Machine
    return Machine.from_board(args.board, p2m=args.p2m, ram=getattr(args, "ram", None))


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more seconds")
    return value


def cmd_run(args) -> int:
    m = _machine(args)
    if not args.json:
        def echo(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            if b"\n" in data:
                sys.stdout.buffer.flush()
        m.console_sinks.append(echo)
    recorder = None
    if args.record:
        from vmm.trace import Recorder
        recorder = Recorder(m, args.record, note=f"recorded from: vmm run {find_image(args.image)} "
                            f"--backend {args.backend} --p2m {m.board.p2m}")
    try:
        result = m.run(args.image, backend=args.backend, timeout=args.timeout)
    finally:
        if recorder is not None:
            recorder.close()
    sys.stdout.flush()
    if args.json:
        print(json.dumps({"status": result.status, "reason": result.reason, "backend": result.backend,
                          "message": result.message, "console": result.console.decode("utf-8", "replace")}))
    elif result.reason != "exit":
        print(f"vmm: {result.message}", file=sys.stderr)
    return result.status


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
    from vmm.board import load_board
    from vmm.machine import ram_ranges
    board = load_board(args.board)
    img = load_image(find_image(args.image), ram_ranges(board.ram))
    print(img.describe())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmm", description="iommu-lab: boot payloads and replay MMIO traces "
                                "against IOMMU device models")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="boot a PVH payload (default: demo)")
    r.add_argument("image", nargs="?", default=None,
                   help=f"ELF path or built payload name ({', '.join(available_images()) or 'none built'})")
    r.add_argument("--backend", choices=["auto", "kvm", "emulated"], default="auto")
    r.add_argument("--board", default="rcar-virt")
    r.add_argument("--p2m", choices=["direct", "scattered"], default=None)
    r.add_argument("--ram", default=None, help="guest RAM size, e.g. 256M")
    r.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds before a runaway guest is stopped (0: no limit)")
    r.add_argument("--record", metavar="TRACE", help="write a replayable qtest-language trace of the run")
    r.add_argument("--json", action="store_true", help="print a JSON summary instead of streaming the console")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("replay", help="replay a qtest-language MMIO trace with no CPU")
    t.add_argument("trace")
    t.add_argument("--board", default="rcar-virt")
    t.add_argument("--p2m", choices=["direct", "scattered"], default=None)
    t.add_argument("--json", action="store_true", help="print a JSON summary")
    t.set_defaults(func=cmd_replay)

    b = sub.add_parser("boards", help="list boards")
    b.add_argument("--types", action="store_true", help="list every registered device type with its board keys")
    b.set_defaults(func=cmd_boards)

    i = sub.add_parser("info", help="show what the loader sees in an ELF")
    i.add_argument("image")
    i.add_argument("--board", default="rcar-virt")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="vmm: %(message)s")
    if args.cmd == "run":
        logging.getLogger("vmm").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ImageError, BoardError, BackendUnavailable) as e:
        print(f"vmm: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
