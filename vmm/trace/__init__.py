"""MMIO traces in QEMU's qtest command language: parse, replay with no CPU, record from a guest run.

A trace is the regression-test currency of the project (DESIGN.md section 4): one request a line,
optionally followed by its reply lines, which replay treats as expectations. QEMU ``-qtest-log``
files are read as they are, so a log captured from QEMU replays here and a trace recorded here
replays in ``qemu -qtest stdio`` (for the requests QEMU's board also has).

Dialect decisions (where qtest leaves room):

- Numbers follow QEMU's ``strtoul(.., 0)``: ``0x`` hex, a leading ``0`` octal, else decimal.
  Replies are compared numerically, so ``OK 0x5`` matches the ``OK 0x0000000000000005`` of a readl.
- A request's reply lines are every ``OK``/``FAIL``/``ERR``/``IRQ`` line up to the next request, in
  any order (QEMU prints the ``IRQ`` lines a request causes before its ``OK``; hand-written traces
  tend to put them after). A bare ``OK`` checks success only; a missing reply checks nothing.
- IRQ edges are checked, as in QEMU, from the first ``irq_intercept_in``/``irq_intercept_out``
  request on (any path: all board lines are intercepted); a trace with IRQ lines but no intercept
  request (the hand-written kind) is checked from its first line. Checked means the edges each
  request causes equal its ``IRQ raise N`` / ``IRQ lower N`` lines, in order, no more and no less.
- ``read``/``write``/``b64*``/``memset`` address guest-physical RAM of dom0 (the CPU's view). An
  address outside RAM is an error (exit 2) unless the trace expects ``FAIL`` there.
- ``#`` starts a comment anywhere on a line. Comment lines of the form ``# key: value`` before the
  first request are the header: ``board``, ``p2m`` and ``ram`` choose the machine a fresh replay
  builds (``vmm replay`` options override them), ``skip`` makes the pytest item skip.
- Log prefixes ``[R +t]``, ``[S +t]``, ``[I t]`` (info, ignored) and the fuzzer's ``[DMA]`` /
  ``[DOUBLE-FETCH]`` tags are stripped.
- A debug-exit write (``outl 0xf4 V``) does not end the replay; V is reported as ``exit_status``.
- ``clock_step [NS]`` / ``clock_set NS`` move a virtual clock no device uses (there are no timers);
  ``endianness`` answers ``little``.

Recording keeps a *twin*: a second, CPU-less machine of the same board, to which every recorded
line is applied as it is written. Before each access the recorder compares the pages the CPU wrote
since the previous access (KVM dirty log / unicorn write hook) with the twin's copy and writes
the differing byte runs as ``write`` lines. So the trace carries exactly the CPU's changes to
memory -- wherever a device may read them by DMA, page-table walk or virtqueue -- while memory that
devices wrote needs no line (the twin's devices wrote it too, as replay's will). Every read is
also checked on the twin as it is recorded, so a trace that would not replay is noticed at once.
"""

from vmm.memory import PAGE
from vmm.trace.language import Request, Trace, TraceError, parse
from vmm.trace.record import Recorder, changed_runs, resident_pages
from vmm.trace.replay import (
    ReplayResult,
    check_header,
    compile_trace,
    machine_for,
    main_replay,
    read_trace,
    replay_file,
    replay_fresh,
    replay_text,
    replay_trace,
)

__all__ = [
    "PAGE", "Recorder", "ReplayResult", "Request", "Trace", "TraceError", "changed_runs", "check_header",
    "compile_trace", "machine_for", "main_replay", "parse", "read_trace", "replay_file", "replay_fresh",
    "replay_text", "replay_trace", "resident_pages",
]
