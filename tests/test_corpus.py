"""The hostile-input corpus (issue 15 "Done when"): every generated case through the CLI, in a
child process under an address-space limit, with no traceback, its documented exit status, a
one-line message, bounded time and bounded memory growth. The generators are tests/corpus.py."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADDRESS_SPACE = 6 << 30           # the child's hard limit: a 10 GB read or allocation fails loudly
CASE_SECONDS = 20
RSS_GROWTH_KIB = 192 << 10        # a case may grow the child's peak RSS by this much at most


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _message_lines(stderr: str) -> list[str]:
    """What the user is told: stderr less argparse's usage block and the start-up wiring warning."""
    lines = []
    for ln in stderr.splitlines():
        if ln.startswith(("usage:", " ")) or "unprotected master" in ln or not ln.strip():
            continue
        lines.append(ln)
    return lines


@pytest.mark.parametrize("kind", ["elf", "trace", "cli"])
def test_corpus(kind):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "corpus.py"), kind], capture_output=True,
                          text=True, timeout=900, preexec_fn=_limit, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(results) > 30
    bad = []
    for r in results:
        why = []
        if r["escaped"]:
            why.append(f"escaped: {r['escaped']}")
        if r["status"] not in r["allowed"]:
            why.append(f"exit {r['status']}, documented {r['allowed']}")
        msg = _message_lines(r["stderr"])
        if r["status"] != 0 and len(msg) != 1 or "Traceback" in r["stderr"]:
            why.append(f"{len(msg)} message lines: {msg[:3]}")
        if r["seconds"] > CASE_SECONDS:
            why.append(f"took {r['seconds']} s")
        if r["rss_growth_kib"] > RSS_GROWTH_KIB:
            why.append(f"peak RSS grew {r['rss_growth_kib'] >> 10} MiB")
        if why:
            bad.append(f"{r['name']} ({' '.join(r['argv'])}): {'; '.join(why)}")
    assert not bad, f"{len(bad)} of {len(results)} cases:\n" + "\n".join(bad)
