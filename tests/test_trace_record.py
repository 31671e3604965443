"""Record a guest run as a trace, replay it with no CPU on a fresh machine, and demand equality:
every read (the replay checks them), the IRQ edges, the console, the debug-exit value and guest
memory (so DMA results too). On both backends, for every payload that passes."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support import BACKENDS
from test_trace import check_trace_and_mutant

from vmm.machine import Machine
from vmm.trace import PAGE, Recorder, machine_for, read_trace, replay_text, replay_trace, resident_pages

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "guest_images"
# Payloads that exist to fail (exit codes, halts, hangs, crashes) for the backbone tests.
FAILURE_MODES = {"exitcode", "halt", "spin", "triple"}
PAYLOADS = sorted(p.stem for p in (GUEST / "out").glob("*.elf") if p.stem not in FAILURE_MODES)


def p2m_for(name: str) -> str:
    """Xen-style payloads drive the IPMMU in stage-2 mode on the shared P2M: a scattered board."""
    return "scattered" if "xen" in name else "direct"


def record(image: str, backend: str, p2m: str, path: Path):
    """Run ``image`` under a Recorder; returns (run result, recorder, run machine's memory snapshot, edges)."""
    m = Machine.from_board("rcar-virt", p2m=p2m)
    edges: list[tuple[int, bool]] = []
    m.irqs.listeners.append(lambda n, level: edges.append((n, level)))
    rec = Recorder(m, path)
    try:
        result = m.run(str(image), backend=backend, timeout=20)
    finally:
        rec.close()
    memory = {gpa: m.dom0.read(gpa, PAGE) for gpa in resident_pages(m)}
    m.close()
    return result, rec, memory, edges


def replay_and_compare(path: Path, result, rec, memory: dict[int, bytes], edges) -> None:
    trace = read_trace(path)
    m = machine_for(trace)
    replay_edges: list[tuple[int, bool]] = []
    m.irqs.listeners.append(lambda n, level: replay_edges.append((n, level)))
    try:
        r = replay_trace(m, trace)
        assert r.ok, r.message
        assert r.exit_status == result.status
        assert bytes(m.console) == result.console
        assert replay_edges == edges
        # Guest memory: every page either run touched, except what the CPU changed after its last
        # access (nothing a device could read; the recorder notes those pages).
        pages = (set(memory) | set(resident_pages(m))) - set(rec.tail_pages)
        zero = bytes(PAGE)
        bad = [hex(gpa) for gpa in sorted(pages) if memory.get(gpa, zero) != m.dom0.read(gpa, PAGE)]
        assert not bad, f"guest pages differ after replay: {bad[:10]}"
    finally:
        m.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("image", PAYLOADS)
def test_record_replay_round_trip(image, backend, tmp_path):
    path = tmp_path / f"{image}.qtrace"
    result, rec, memory, edges = record(GUEST / "out" / f"{image}.elf", backend, p2m_for(image), path)
    if result.status != 0:
        pytest.skip(f"{image} exits {result.status} on {backend} ({result.reason}), not a passing payload")
    assert rec.divergences == []
    assert rec.unrepresentable == 0
    replay_and_compare(path, result, rec, memory, edges)
    check_trace_and_mutant(path.read_text(), path.name, replay_original=False)    # replayed just above


# A payload that leans on what the recorder must get right: DMA from CPU-written memory, CPU
# changes to memory a device wrote (zeroing a DMA destination restores bytes the recorder's
# twin never saw from the CPU), IRQ edges, and 8-byte MMIO.
DMA_PAYLOAD = r"""
#include "runtime.h"
#include "board.h"

static void copy(uint64_t src, uint64_t dst, uint32_t len)
{
    uint64_t e = DMA_ENGINE(3);
    mmio_write64(e + DMA_SRC, src);
    mmio_write64(e + DMA_DST, dst);
    mmio_write32(e + DMA_LEN, len);
    mmio_write32(e + DMA_CTRL, DMA_CTRL_RUN | DMA_CTRL_IRQ);
}

int main(struct hvm_start_info *si)
{
    (void)si;
    uint8_t *a = alloc_pages(1), *b = alloc_pages(1), *c = alloc_pages(2);
    for (int i = 0; i < 300; i++)
        a[i] = (uint8_t)(i * 7 + 1);
    copy((uintptr_t)a, (uintptr_t)b, 300);
    check(mmio_read32(DMA_ENGINE(3) + DMA_STATUS) == 0, "copy 1 status");
    check(memcmp(a, b, 300) == 0, "copy 1 data");
    check(mmio_read32(DMA_ENGINE(3) + DMA_IRQ_STATUS) == 1, "irq raised");
    mmio_write32(DMA_ENGINE(3) + DMA_IRQ_STATUS, 1);
    memset(b, 0, 300);                                   /* back to what the page held before the DMA */
    b[299] = 0x5a;
    copy((uintptr_t)b, (uintptr_t)c + 4000, 300);        /* a device reads it: crosses a page */
    int ok = 1;
    for (int i = 0; i < 299; i++)
        ok &= c[4000 + i] == 0;
    check(ok && c[4299] == 0x5a, "copy 2 saw the CPU's zeroes");
    mmio_write32(DMA_ENGINE(3) + DMA_IRQ_STATUS, 1);
    return finish();
}
"""


@pytest.fixture(scope="module")
def dma_payload(tmp_path_factory) -> Path:
    if not (shutil.which("gcc") and (GUEST / "runtime" / "link.ld").exists()):
        pytest.skip("gcc or the guest runtime is not available")
    out = tmp_path_factory.mktemp("payload")
    (out / "dmarec.c").write_text(DMA_PAYLOAD)
    cflags = ["-m64", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-nostdlib", "-static", "-mno-red-zone",
              "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-builtin",
              "-std=gnu11", f"-I{GUEST / 'runtime'}", f"-I{GUEST / 'include'}", f"-I{GUEST}"]
    ldflags = ["-m64", "-nostdlib", "-static", "-no-pie", "-T", str(GUEST / "runtime" / "link.ld"),
               "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack"]
    srcs = [out / "dmarec.c", GUEST / "runtime" / "start.S", GUEST / "runtime" / "lib.c"]
    elf = out / "dmarec.elf"
    proc = subprocess.run(["gcc", *cflags, *ldflags, "-o", str(elf), *map(str, srcs), "-lgcc"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return elf


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_carries_dma_inputs_and_cpu_changes_to_dma_output(dma_payload, backend, tmp_path):
    path = tmp_path / "dmarec.qtrace"
    result, rec, memory, edges = record(dma_payload, backend, "direct", path)
    assert result.status == 0, result.console.decode()
    assert edges == [(11, True), (11, False), (11, True), (11, False)]
    assert rec.divergences == []
    replay_and_compare(path, result, rec, memory, edges)


def test_recorder_without_a_cpu(tmp_path):
    """Tests that drive a machine directly can record too: memory is diffed over touched pages."""
    m = Machine.from_board("rcar-virt")
    rec = Recorder(m, None)
    m.write_guest(0x5000, b"hello, dma")
    assert m.dma("dma3", 0x5000, 0x9000, 10, irq=True) == (0, 0)
    m.mmio_write(0x0B003034, 4, 1)
    rec.close()
    text = rec.text()
    assert "write 0x5000 0xa 0x68656c6c6f2c20646d61" in text and "IRQ raise 11" in text
    assert "0x9000" not in text.replace("writeq 0xb003010 0x9000", "")    # the device's output is not recorded
    m2 = Machine.from_board("rcar-virt")
    try:
        r = replay_text(m2, text, "rec")
        assert r.ok, r.message
        assert m2.read_guest(0x9000, 10) == b"hello, dma"
    finally:
        m2.close()
        m.close()
