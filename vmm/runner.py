"""Boot a payload on a machine: load the ELF, pick the backend, run, report."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vmm.backends import BackendUnavailable, CpuBackend, RunResult
from vmm.elfload import load_image, place, read_initrd
from vmm.images import find_image

if TYPE_CHECKING:
    from vmm.gdbstub import GdbServer

log = logging.getLogger("vmm")


def choose_backend(name: str, debug: bool = False) -> type[CpuBackend]:
    """The backend class for ``name`` (auto, kvm, emulated). Each backend module is imported only
    when it is chosen: unicorn costs start-up time a KVM run does not need, and the reverse.
    ``debug`` (a GDB stub will drive it): auto takes KVM only if it can debug a guest, and an
    explicit kvm that cannot is refused with the reason."""
    if name == "emulated":
        from vmm.backends.emulated import EmulatedBackend
        return EmulatedBackend
    if name not in ("kvm", "auto"):
        raise ValueError(f"unknown backend {name!r} (auto, kvm, emulated)")
    from vmm.backends.kvm import KvmBackend, kvm_usable
    from vmm.backends.kvm_debug import kvm_debug_usable

    ok, why = kvm_debug_usable() if debug else kvm_usable()
    if name == "kvm":
        if debug and not ok:
            raise BackendUnavailable(f"backend kvm cannot be debugged here: {why}; use --backend emulated")
        return KvmBackend
    if ok:
        log.info("backend: kvm (/dev/kvm is usable)")
        return KvmBackend
    from vmm.backends.emulated import EmulatedBackend
    log.info("backend: emulated (%s)", why)
    return EmulatedBackend


def run_image(machine, image: str | None, backend: str = "auto", timeout: float = 10.0,
              gdb: GdbServer | None = None, cmdline: str = "", initrd: str | None = None) -> RunResult:
    """Load ``image`` (a PVH ELF or a bzImage), hand it ``cmdline`` and the ``initrd`` file (module 0)
    through hvm_start_info, and run it on ``backend``; with ``gdb`` (a listening
    vmm.gdbstub.GdbServer) the guest runs under its stub, which takes the socket over and closes it."""
    dom = machine.dom0
    img = load_image(find_image(image), dom.ram_ranges)
    modules = [read_initrd(initrd, dom.ram_size)] if initrd is not None else []
    start_info = place(img, dom.write, dom.ram_ranges, cmdline=cmdline, modules=modules)
    cls = choose_backend(backend, debug=gdb is not None)
    # An access observer such as vmm.trace.Recorder may need the pages the CPU writes (dirty
    # tracking, off otherwise because it slows the guest) and a last look at them before the CPU goes.
    observers = list(machine.observers)
    track = any(o.needs_dirty_pages for o in observers)
    try:
        cpu: CpuBackend = cls(machine, track_dirty=True) if track else cls(machine)
    except BackendUnavailable as e:
        raise BackendUnavailable(f"backend {cls.name} unavailable: {e}") from None
    for o in observers:
        o.attach_cpu(cpu)
    try:
        if gdb is not None:
            result = gdb.serve(cpu, machine, img.entry, start_info, timeout)
        else:
            result = cpu.run(img.entry, start_info, timeout)
    finally:
        for o in observers:
            o.detach_cpu(cpu)
        cpu.close()
    result.console = bytes(machine.console)
    return result
