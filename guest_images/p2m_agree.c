/*
 * p2m_agree: the CPU and DMA must see the same machine frame for a guest page.
 * The guest writes a pattern at GPA X and pokes the test device at 0x0D000000;
 * while that write is in flight the harness checks the frame the P2M names and
 * remaps X to a new machine frame. The guest then writes a second pattern,
 * which must land in the new frame, and pokes again.
 */
#include "runtime.h"

#define X       0x800000ULL
#define TESTDEV 0x0D000000ULL

static void fill(uint64_t tag)
{
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)X;
    for (int i = 0; i < 512; i++)
        p[i] = tag | (uint64_t)i;
}

int main(struct hvm_start_info *si)
{
    (void)si;
    fill(0xA5A5000000000000ULL);
    mmio_write32(TESTDEV, 1);          /* harness: check frame Y, remap X -> Z */
    fill(0x5A5A000000000000ULL);
    mmio_write32(TESTDEV, 2);          /* harness: check frame Z */
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)X;
    check(p[7] == (0x5A5A000000000000ULL | 7), "guest reads its second pattern back after the remap");
    return finish();
}
