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
- Every request that takes an address addresses system memory as qtest does: guest RAM of dom0
  by GPA (the CPU's view) and the device windows. ``readb..q``/``writeb..q`` go to whatever the
  address holds (RAM, little-endian; a device; a hole reads 0 as on the bus). ``read``/``write``/
  ``b64*``/``memset`` must lie wholly in one RAM range or one device window (split into aligned
  accesses of at most 4 bytes there); anything else is an error (exit 2) unless the trace expects
  ``FAIL``. Ranges are checked before anything is allocated (see ``vmm.trace.sysmem``).
- Strict numbers: no sign, no ``_``, at most 64 bits; ``read``/``b64read`` at most 1 MiB, a line
  at most 8 MiB. A UTF-8 byte-order mark is accepted. A trace with no request is an error (exit
  2): a regression test that checks nothing must not pass.
- Traces stream: a replay keeps only the current request and a bounded cache of distinct lines,
  so memory does not grow with a trace's length, and a problem is reported at the first line
  where it shows (a malformed line after a mismatch is not reached).
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
from vmm.trace.batch import main_replay, replay_path, replay_paths
from vmm.trace.language import Request, Trace, TraceError, parse, read_trace
from vmm.trace.record import Recorder, changed_runs, resident_pages
from vmm.trace.replay import (
    ReplayResult,
    check_header,
    machine_for,
    replay_file,
    replay_fresh,
    replay_text,
    replay_trace,
)

__all__ = [
    "PAGE", "Recorder", "ReplayResult", "Request", "Trace", "TraceError", "changed_runs", "check_header",
    "machine_for", "main_replay", "parse", "read_trace", "replay_file", "replay_fresh", "replay_path",
    "replay_paths", "replay_text", "replay_trace", "resident_pages",
]
