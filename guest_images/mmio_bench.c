/*
 * mmio_bench: N 4-byte MMIO reads of a trivial device at 0x0D000000, for
 * bench/mmio.py. N comes from the device itself (offset 8) so one ELF serves
 * every run; the sum keeps the compiler honest.
 */
#include "runtime.h"

#define TESTDEV 0x0D000000ULL

int main(struct hvm_start_info *si)
{
    (void)si;
    uint32_t n = mmio_read32(TESTDEV + 8);
    uint32_t sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += mmio_read32(TESTDEV);
    return sum == n * 0x1234u ? 0 : 1;
}
