/*
 * mmio_widths: one access of each width, in a fixed order, against the
 * recording test device the harness places at 0x0D000000.  The test checks
 * the device saw exactly these (address, size, value) accesses — no split
 * or merged ones — and that the values read come back to the guest.
 */
#include "runtime.h"

#define TESTDEV 0x0D000000ULL

int main(struct hvm_start_info *si)
{
    (void)si;
    mmio_write8(TESTDEV + 0x0, 0x11);
    mmio_write16(TESTDEV + 0x2, 0x2233);
    mmio_write32(TESTDEV + 0x4, 0x44556677);
    mmio_write64(TESTDEV + 0x8, 0x8899AABBCCDDEEFFULL);

    uint8_t r8 = mmio_read8(TESTDEV + 0x0);
    uint16_t r16 = mmio_read16(TESTDEV + 0x2);
    uint32_t r32 = mmio_read32(TESTDEV + 0x4);
    uint64_t r64 = mmio_read64(TESTDEV + 0x8);
    uint64_t r64b = mmio_read64(TESTDEV + 0x10);

    printf("r8=0x%02x\n", r8);
    printf("r16=0x%04x\n", r16);
    printf("r32=0x%08x\n", r32);
    printf("r64=0x%016llx\n", (unsigned long long)r64);
    printf("r64b=0x%016llx\n", (unsigned long long)r64b);
    return 0;
}
