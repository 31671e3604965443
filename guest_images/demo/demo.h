/*
 * The demo payload (`vmm run` with no image) is demo.c plus every
 * demo/<part>.c.  Each part is one section of checks, a function taking no
 * arguments; demo.c runs them in the order below.  Parts living in their
 * own files are declared weak, so the demo builds and runs whether or not
 * that file exists yet: main() skips a part that is not linked in.
 */
#ifndef IOMMU_LAB_DEMO_H
#define IOMMU_LAB_DEMO_H

#include "runtime.h"
#include "board.h"

/* demo.c */
void demo_sysinfo(void);
void demo_ram(void);

/* demo/ipmmu.c, demo/virtio_iommu.c, demo/dma_bugs.c (optional) */
void demo_ipmmu(void) __attribute__((weak));
void demo_virtio_iommu(void) __attribute__((weak));
void demo_dma_bugs(void) __attribute__((weak));
void demo_pasid(void) __attribute__((weak));            /* demo/pasid.c */

#endif
