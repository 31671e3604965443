"""pytest plugin (entry point ``pytest11``): board machines, guest runs and trace replays for tests.

Fixtures:

- ``machine``: a fresh board machine, closed after the test. ``@pytest.mark.machine(p2m="scattered")``
  (also ``board=``, ``ram=``) chooses another one.
- ``run_guest``: ``run_guest(name, backend="auto", p2m=None, ...) -> RunResult`` boots a payload on a
  fresh machine. With indirect parametrisation (``@pytest.mark.parametrize("run_guest", ["kvm"],
  indirect=True)``) the parameter is the default backend.
- ``replay``: ``replay(trace, board=None, p2m=None) -> ReplayResult`` replays a trace file or trace
  text on a fresh machine built as the trace's header (``# board:``, ``# p2m:``, ``# ram:``) asks.

Collection: every ``*.qtrace`` file in a directory named ``traces`` (e.g. ``tests/traces/``) becomes
a test item; it fails with the replayer's own ``TRACE:LINE: expected ..., got ...`` message, so a
trace dropped into the folder is a regression test. ``# skip: why`` in its header skips it.

Imports of the machine are deferred: this module is loaded into every pytest session of the venv.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vmm.backends import RunResult
    from vmm.machine import Machine
    from vmm.trace import ReplayResult


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "machine(board=..., p2m=..., ram=...): options of the `machine` fixture")


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    """A fresh ``rcar-virt`` machine (or what ``@pytest.mark.machine`` asks for), closed after the test."""
    from vmm.machine import Machine
    marker = request.node.get_closest_marker("machine")
    kw = dict(marker.kwargs) if marker else {}
    m = Machine.from_board(kw.pop("board", "rcar-virt"), **kw)
    yield m
    m.close()


@pytest.fixture
def run_guest(request: pytest.FixtureRequest) -> Callable[..., RunResult]:
    """Boot a payload (name or ELF path) on a fresh machine and return its RunResult."""
    from vmm.machine import Machine
    default_backend = getattr(request, "param", "auto")

    def run(image: str | None = None, backend: str | None = None, *, board: str = "rcar-virt",
            p2m: str | None = None, ram: str | int | None = None, timeout: float = 10.0) -> RunResult:
        m = Machine.from_board(board, p2m=p2m, ram=ram)
        try:
            return m.run(image, backend=backend or default_backend, timeout=timeout)
        finally:
            m.close()

    return run


@pytest.fixture
def replay() -> Callable[..., ReplayResult]:
    """Replay a trace (a path, or trace text) on a fresh machine and return the ReplayResult."""
    from vmm.trace import replay_fresh

    def run(trace: str | Path, board: str | None = None, p2m: str | None = None,
            ram: str | None = None) -> ReplayResult:
        return replay_fresh(trace, board=board, p2m=p2m, ram=ram)

    return run


# -- *.qtrace files as test items --------------------------------------------------------------
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".qtrace" and "traces" in file_path.parent.parts:
        return TraceFile.from_parent(parent, path=file_path)
    return None


class TraceFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        yield TraceItem.from_parent(self, name=self.path.name)


class TraceMismatch(Exception):
    """A trace that did not replay; its message is the replayer's report."""


class TraceItem(pytest.Item):
    """One trace replayed on a fresh machine built from its header."""

    def runtest(self) -> None:
        from vmm.trace import replay_trace
        from vmm.trace.batch import build_machine, open_trace
        trace, why = open_trace(str(self.path))
        if trace is None:                     # unreadable or malformed: this item fails, not the session
            raise TraceMismatch(why)
        if "skip" in trace.header:
            pytest.skip(trace.header["skip"] or "skipped by its header")
        m, why = build_machine(trace)
        if m is None:                         # its header asks for a machine that cannot be built
            raise TraceMismatch(why)
        try:
            result = replay_trace(m, trace)
        finally:
            m.close()
        self.user_properties.append(("counts", result.counts))
        if not result.ok:
            raise TraceMismatch(result.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, TraceMismatch):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"trace {self.path.name}"
