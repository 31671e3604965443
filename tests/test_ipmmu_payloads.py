"""The IPMMU guest payloads on both backends: the Linux sequence on the direct-mapped board, the
Xen sequence on a scattered P2M (where only stage-2 mode can work). Exit status = failed checks."""
from __future__ import annotations

import pytest
from support import BACKENDS

from vmm import Machine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image,p2m", [("ipmmu_linux", "direct"), ("ipmmu_xen", "scattered")])
def test_payload_passes(backend, image, p2m):
    m = Machine.from_board("rcar-virt", p2m=p2m)
    try:
        r = m.run(image, backend=backend, timeout=60)
    finally:
        m.close()
    text = r.console.decode()
    assert (r.status, r.reason) == (0, "exit"), text[-3000:]
    assert "FAIL" not in text and "0 failures" in text
    assert text.count("PASS") >= 20
