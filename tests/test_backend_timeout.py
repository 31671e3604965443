"""Timeouts hold wherever ``run`` is called: the main thread, a worker thread, twice in a row.

On KVM the timeout is a timer thread that kicks the vCPU (the run page's immediate_exit flag and a
signal to the vCPU thread); SIGALRM, which reaches only the main thread, is not involved.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest
from support import BACKENDS

from vmm import Machine
from vmm.backends import EXIT_TIMEOUT


def run_spin(backend: str, timeout: float):
    m = Machine.from_board("rcar-virt")
    try:
        return m.run("spin", backend=backend, timeout=timeout)
    finally:
        m.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_spin_times_out_in_a_worker_thread(backend):
    box: dict = {}

    def work():
        t0 = time.monotonic()
        try:
            box["result"] = run_spin(backend, 1.0)
        except BaseException as e:      # noqa: BLE001 - reported by the assertion below
            box["error"] = e
        box["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(30)
    assert not th.is_alive(), "run() in a worker thread ignored its 1 s timeout"
    assert "error" not in box, box.get("error")
    r = box["result"]
    assert (r.status, r.reason) == (EXIT_TIMEOUT, "timeout")
    assert "still running after 1 s" in r.message
    assert 0.9 <= box["elapsed"] < 15


@pytest.mark.parametrize("backend", BACKENDS)
def test_spin_times_out_in_the_main_thread_and_leaves_sigalrm_alone(backend):
    def handler(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, handler)
    try:
        t0 = time.monotonic()
        r = run_spin(backend, 0.5)
        assert (r.status, r.reason) == (EXIT_TIMEOUT, "timeout")
        assert time.monotonic() - t0 < 15
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_finished_run_is_not_kicked_later(backend):
    """The timer dies with the run: a quick exit, then a wait past the timeout, then another run."""
    m = Machine.from_board("rcar-virt")
    try:
        assert m.run("exitcode", backend=backend, timeout=0.3).status == 42
    finally:
        m.close()
    time.sleep(0.5)                    # a stray kick would land here (harmless) or below (a false timeout)
    m = Machine.from_board("rcar-virt")
    try:
        assert m.run("hello", backend=backend, timeout=10).status == 0
    finally:
        m.close()
