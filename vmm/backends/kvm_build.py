"""cffi (API mode) builder for the KVM exit path: ``KVM_RUN`` and the exit decoding in C.

The VMM loop stays in Python (vmm/backends/kvm.py); per exit it makes one C call, ``kx_run``,
which finishes the read Python answered last time, enters the guest and decodes the exit into a
``struct kx_exit`` that Python reads through one memoryview (address, width, value). String port
I/O (``rep ins/outs``: one exit, ``count`` elements) comes back one element per call without
re-entering the guest, so Python sees every access as the same three numbers.

Works as a setuptools ``cffi_modules=["vmm/backends/kvm_build.py:ffibuilder"]`` entry and when run
directly (``python vmm/backends/kvm_build.py``), which compiles in place like the walker.
"""
from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
struct kx_exit {
    uint64_t addr;
    uint64_t size;
    uint64_t value;
    ...;
};
#define KX_MMIO_READ 1
#define KX_MMIO_WRITE 2
#define KX_PIO_IN 3
#define KX_PIO_OUT 4
#define KX_INTR 5
#define KX_BAD_IO 6
#define KX_OTHER 256
int kx_init(struct kx_exit *x, int vcpu_fd, void *run, uint64_t run_size);
int kx_run(struct kx_exit *x);
void kx_kick(struct kx_exit *x);
void kx_clear_kick(struct kx_exit *x);
int kx_install_kick_handler(int sig);
"""

SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define KX_MMIO_READ 1
#define KX_MMIO_WRITE 2
#define KX_PIO_IN 3
#define KX_PIO_OUT 4
#define KX_INTR 5          /* KVM_RUN interrupted by a signal (timeout kick, Ctrl-C) */
#define KX_BAD_IO 6        /* an I/O exit whose data lies outside the run page (never from a sane KVM) */
#define KX_OTHER 256       /* | exit_reason: everything that ends the run */

/* What Python reads: the first three fields, as one uint64 memoryview. The rest is private. */
struct kx_exit {
    uint64_t addr;        /* MMIO guest-physical address or I/O port */
    uint64_t size;        /* access width in bytes (1..8) */
    uint64_t value;       /* write/out: the value; read/in: Python stores the reply here */
    struct kvm_run *run;
    uint64_t run_size;
    int fd;
    uint32_t pending;     /* KX_MMIO_READ / KX_PIO_IN: copy value into the run page before re-entry */
    uint32_t io_index, io_count, io_out;
    uint64_t io_offset;
};

int kx_init(struct kx_exit *x, int vcpu_fd, void *run, uint64_t run_size)
{
    memset(x, 0, sizeof(*x));
    x->fd = vcpu_fd;
    x->run = run;
    x->run_size = run_size;
    return run_size >= sizeof(struct kvm_run) ? 0 : -1;
}

/* The next element of a string I/O exit (count > 1 for rep ins/outs). */
static int next_io(struct kx_exit *x)
{
    uint64_t at = x->io_offset + (uint64_t)x->io_index * x->size;
    x->io_index++;
    x->value = 0;
    if (x->io_out) {
        memcpy(&x->value, (char *)x->run + at, x->size);
        return KX_PIO_OUT;
    }
    x->pending = KX_PIO_IN;
    return KX_PIO_IN;
}

int kx_run(struct kx_exit *x)
{
    struct kvm_run *run = x->run;

    if (x->pending == KX_MMIO_READ)
        memcpy(run->mmio.data, &x->value, x->size);
    else if (x->pending == KX_PIO_IN)
        memcpy((char *)run + x->io_offset + (uint64_t)(x->io_index - 1) * x->size, &x->value, x->size);
    x->pending = 0;
    if (x->io_index < x->io_count)
        return next_io(x);
    x->io_count = x->io_index = 0;

    if (ioctl(x->fd, KVM_RUN, 0) < 0)
        return errno == EINTR || errno == EAGAIN ? KX_INTR : -errno;
    switch (run->exit_reason) {
    case KVM_EXIT_MMIO:
        x->addr = run->mmio.phys_addr;
        x->size = run->mmio.len <= 8 ? run->mmio.len : 8;
        x->value = 0;
        if (run->mmio.is_write) {
            memcpy(&x->value, run->mmio.data, x->size);
            return KX_MMIO_WRITE;
        }
        x->pending = KX_MMIO_READ;
        return KX_MMIO_READ;
    case KVM_EXIT_IO:
        x->addr = run->io.port;
        x->size = run->io.size;
        x->io_out = run->io.direction == KVM_EXIT_IO_OUT;
        x->io_offset = run->io.data_offset;
        if (x->size < 1 || x->size > 8 || x->io_offset > x->run_size ||
            (uint64_t)run->io.count * x->size > x->run_size - x->io_offset)
            return KX_BAD_IO;
        x->io_count = run->io.count;
        if (!x->io_count)
            return kx_run(x);
        return next_io(x);
    case KVM_EXIT_INTR:
        return KX_INTR;
    default:
        return KX_OTHER | (int)run->exit_reason;
    }
}

/* From any thread: the next (or current, with a signal) KVM_RUN returns EINTR at once. */
void kx_kick(struct kx_exit *x)
{
    __atomic_store_n(&x->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

void kx_clear_kick(struct kx_exit *x)
{
    __atomic_store_n(&x->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

static void kx_noop(int sig)
{
    (void)sig;
}

/*
 * A do-nothing handler, so that a signal sent to the vCPU thread only interrupts KVM_RUN.
 * sigaction works from any thread (Python's signal.signal only from the main one). A handler
 * someone else installed is left alone (it interrupts KVM_RUN as well): returns 1 then, 0 when
 * ours is in place, -errno on failure.
 */
int kx_install_kick_handler(int sig)
{
    struct sigaction old, sa;
    if (sigaction(sig, NULL, &old) < 0)
        return -errno;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == kx_noop)
        return 0;
    if ((old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN))
        return 1;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kx_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;        /* no SA_RESTART: the point is the EINTR */
    if (sigaction(sig, &sa, NULL) < 0)
        return -errno;
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm.backends._kvm", SOURCE, extra_compile_args=["-O2", "-Wall"])



def compile_in_place() -> None:
    """Build ``vmm/backends/_kvm*.so`` in the source tree (what the editable install does)."""
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(_HERE)), verbose=False)
    obj = os.path.join(_HERE, "_kvm.o")
    if os.path.exists(obj):
        os.remove(obj)


if __name__ == "__main__":
    compile_in_place()
