/*
 * iommu-lab guest runtime library: start-up glue, traps, console, printf,
 * string functions, page allocator and the test-report helpers.
 */
#include "runtime.h"

struct hvm_start_info *start_info;

/* Linker-script symbols: end of the loaded image (page aligned). */
extern char _end[];

/* ------------------------------------------------------------------------ */
/* Exit */

void exit(int code)
{
    outl(DEBUG_EXIT_PORT, (uint32_t)code);
    /* Reached only when nothing listens on 0xF4 (e.g. QEMU without
     * isa-debug-exit): stop here with interrupts off. */
    for (;;) {
        cli();
        hlt();
    }
}

/* ------------------------------------------------------------------------ */
/* IDT: 256 interrupt gates pointing at the 16-byte stubs in start.S. */

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t reserved;
};
_Static_assert(sizeof(struct idt_gate) == 16, "IDT gate layout");

#define SEL_CODE64     0x08
#define GATE_INTR64    0x8E   /* present, DPL 0, 64-bit interrupt gate */

extern char isr_stubs[];
static struct idt_gate idt[256] __attribute__((aligned(16)));

static void idt_init(void)
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) desc;

    for (unsigned v = 0; v < ARRAY_SIZE(idt); v++) {
        uint64_t handler = (uint64_t)(uintptr_t)(isr_stubs + 16 * v);
        idt[v].offset_lo = (uint16_t)handler;
        idt[v].selector = SEL_CODE64;
        idt[v].ist = 0;
        idt[v].type_attr = GATE_INTR64;
        idt[v].offset_mid = (uint16_t)(handler >> 16);
        idt[v].offset_hi = (uint32_t)(handler >> 32);
        idt[v].reserved = 0;
    }
    desc.limit = sizeof(idt) - 1;
    desc.base = (uint64_t)(uintptr_t)idt;
    __asm__ volatile("lidt %0" : : "m"(desc) : "memory");
}

static const char *const exception_names[] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint",
    "#OF overflow", "#BR bound range", "#UD invalid opcode", "#NM no FPU",
    "#DF double fault", "coprocessor overrun", "#TS invalid TSS", "#NP segment not present",
    "#SS stack fault", "#GP general protection", "#PF page fault", "reserved",
    "#MF x87 error", "#AC alignment check", "#MC machine check", "#XM SIMD error",
    "#VE virtualization", "#CP control protection",
};

/* Called by isr_common for every vector.  Nothing here expects interrupts
 * or exceptions, so report and stop with EXIT_TRAP; a harness sees the
 * status, a human sees the vector and where it happened. */
void trap_handler(struct trap_frame *f);
void trap_handler(struct trap_frame *f)
{
    const char *name = f->vector < ARRAY_SIZE(exception_names)
                           ? exception_names[f->vector]
                           : (f->vector < 32 ? "reserved exception" : "interrupt");
    uint64_t cr2;

    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    printf("\nTRAP: vector %llu (%s) error 0x%llx rip 0x%016llx rsp 0x%016llx",
           (unsigned long long)f->vector, name, (unsigned long long)f->error_code,
           (unsigned long long)f->rip, (unsigned long long)f->rsp);
    if (f->vector == 14)
        printf(" cr2 0x%016llx", (unsigned long long)cr2);
    putchar('\n');
    exit(EXIT_TRAP);
}

/* ------------------------------------------------------------------------ */
/* Page allocator */

static uint64_t alloc_next;   /* next free page */
static uint64_t alloc_limit;  /* end of the RAM region holding the image */

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

static void alloc_init(const struct hvm_start_info *si)
{
    uint64_t image_end = (uint64_t)(uintptr_t)_end;
    const struct hvm_memmap_entry *map;

    alloc_next = align_up(image_end, PAGE_SIZE);
    alloc_limit = 0;
    if (!si || si->magic != HVM_START_MAGIC || si->version < 1 || !si->memmap_paddr)
        return;    /* no memmap: we do not know where RAM ends, so hand out nothing */

    map = (const struct hvm_memmap_entry *)(uintptr_t)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++) {
        if (map[i].type == HVM_MEMMAP_RAM && map[i].addr <= image_end &&
            image_end < map[i].addr + map[i].size) {
            alloc_limit = (map[i].addr + map[i].size) & ~(PAGE_SIZE - 1);
            break;
        }
    }
}

void *alloc_pages(size_t n)
{
    uint64_t bytes;
    void *p;

    /* Compare in pages so that a huge n cannot overflow n * PAGE_SIZE. */
    if (n == 0 || alloc_limit <= alloc_next || n > (alloc_limit - alloc_next) / PAGE_SIZE)
        return 0;
    bytes = (uint64_t)n * PAGE_SIZE;
    p = (void *)(uintptr_t)alloc_next;
    alloc_next += bytes;
    return memset(p, 0, bytes);
}

uint64_t ram_end(void)
{
    return alloc_limit;
}

/* ------------------------------------------------------------------------ */
/* Start-up: called by start.S in 64-bit mode before main(). */

void runtime_init(struct hvm_start_info *si);
void runtime_init(struct hvm_start_info *si)
{
    start_info = si;
    idt_init();
    alloc_init(si);
}

/* ------------------------------------------------------------------------ */
/* Strings.  memset/memcpy use rep stos/movs in asm: GCC may turn a plain C
 * byte loop back into a call to memset/memcpy, i.e. into itself. */

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;

    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;

    while (s[n])
        n++;
    return n;
}

/* ------------------------------------------------------------------------ */
/* Console */

int putchar(int c)
{
    outb(DEBUGCON_PORT, (uint8_t)c);
    return (unsigned char)c;
}

int puts(const char *s)
{
    while (*s)
        putchar(*s++);
    putchar('\n');
    return 0;
}

/* Print `v` in `base`, right-aligned in `width` (padded with `pad`), or
 * left-aligned when `left`.  Returns the number of characters written. */
static int put_number(uint64_t v, unsigned base, int upper, int negative,
                      int width, char pad, int left, const char *prefix)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char buf[24];
    int len = 0, plen = (int)strlen(prefix) + (negative ? 1 : 0), n = 0;

    do {
        buf[len++] = digits[v % base];
        v /= base;
    } while (v);

    /* Zero padding goes between sign/prefix and digits; spaces go outside. */
    if (!left && pad == ' ')
        for (; width > len + plen; width--, n++)
            putchar(' ');
    if (negative)
        putchar('-');
    for (const char *p = prefix; *p; p++)
        putchar(*p);
    n += plen;
    if (!left && pad == '0')
        for (; width > len + plen; width--, n++)
            putchar('0');
    for (int i = len - 1; i >= 0; i--)
        putchar(buf[i]);
    n += len;
    if (left)
        for (; width > len + plen; width--, n++)
            putchar(' ');
    return n;
}

/* Supports %d %i %u %x %X %p %s %c %%, flags '0' and '-', a decimal field
 * width, and the length modifiers h, hh, l, ll, z. */
int vprintf(const char *fmt, va_list ap)
{
    int n = 0;

    for (; *fmt; fmt++) {
        int left = 0, width = 0, lng = 0, half = 0, size_t_arg = 0;
        char pad = ' ';
        uint64_t u;

        if (*fmt != '%') {
            putchar(*fmt);
            n++;
            continue;
        }
        fmt++;
        for (;; fmt++) {
            if (*fmt == '0')
                pad = '0';
            else if (*fmt == '-')
                left = 1;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        for (;; fmt++) {
            if (*fmt == 'l')
                lng++;
            else if (*fmt == 'h')
                half++;
            else if (*fmt == 'z')
                size_t_arg = 1;
            else
                break;
        }
        if (left)
            pad = ' ';

        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t s;
            if (lng >= 2)
                s = va_arg(ap, long long);
            else if (lng == 1 || size_t_arg)
                s = va_arg(ap, long);
            else
                s = va_arg(ap, int);
            if (half == 1)
                s = (short)s;
            else if (half >= 2)
                s = (signed char)s;
            u = s < 0 ? -(uint64_t)s : (uint64_t)s;
            n += put_number(u, 10, 0, s < 0, width, pad, left, "");
            break;
        }
        case 'u':
        case 'x':
        case 'X':
            if (lng >= 2)
                u = va_arg(ap, unsigned long long);
            else if (lng == 1 || size_t_arg)
                u = va_arg(ap, unsigned long);
            else
                u = va_arg(ap, unsigned int);
            if (half == 1)
                u = (uint16_t)u;
            else if (half >= 2)
                u = (uint8_t)u;
            n += put_number(u, *fmt == 'u' ? 10 : 16, *fmt == 'X', 0, width, pad, left, "");
            break;
        case 'p':
            u = (uint64_t)(uintptr_t)va_arg(ap, void *);
            n += put_number(u, 16, 0, 0, width, pad, left, "0x");
            break;
        case 'c':
            putchar(va_arg(ap, int));
            n++;
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            int len;
            if (!s)
                s = "(null)";
            len = (int)strlen(s);
            if (!left)
                for (; width > len; width--, n++)
                    putchar(' ');
            n += len;
            while (*s)
                putchar(*s++);
            for (; width > len; width--, n++)
                putchar(' ');
            break;
        }
        case '%':
            putchar('%');
            n++;
            break;
        case '\0':
            return n;    /* lone '%' at the end: stop */
        default:         /* unknown conversion: print it verbatim */
            putchar('%');
            putchar(*fmt);
            n += 2;
            break;
        }
    }
    return n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

/* ------------------------------------------------------------------------ */
/* Test reporting.  Note: never print "N passed, N failed" — CI log parsers
 * read lines of that form. */

static int nr_checks, nr_failed;

void check(int ok, const char *fmt, ...)
{
    va_list ap;

    nr_checks++;
    if (!ok)
        nr_failed++;
    printf("%s: ", ok ? "PASS" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

int checks_failed(void)
{
    return nr_failed;
}

void section(const char *name)
{
    printf("== %s ==\n", name);
}

int finish(void)
{
    printf("done: %d checks, %d failures\n", nr_checks, nr_failed);
    return nr_failed;
}
