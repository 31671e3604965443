/* labexit: end the run from Linux user space through the debug-exit port 0xF4 (DESIGN.md
 * section 2), for kernels built without /dev/port (Debian's cloud kernels): ioperm(0xF4, 4, 1),
 * then outl(V). Usage: labexit V. Freestanding and static: no libc is needed in the initramfs. */
#define SYS_exit 60
#define SYS_ioperm 173

static long sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

__attribute__((used, noreturn)) void run(long argc, char **argv);
__attribute__((used, noreturn)) void run(long argc, char **argv)
{
    unsigned int v = 0;
    const char *s = argc > 1 ? argv[1] : "0";
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (unsigned int)(*s++ - '0');
    if (sys3(SYS_ioperm, 0xF4, 4, 1) == 0)
        __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"((unsigned short)0xF4));
    sys3(SYS_exit, 1, 0, 0);            /* only reached when the port did not end the run */
    __builtin_unreachable();
}

__attribute__((naked, noreturn)) void _start(void)
{
    __asm__ volatile("mov (%rsp), %rdi\n\tlea 8(%rsp), %rsi\n\tand $-16, %rsp\n\tcall run\n\tud2");
}
