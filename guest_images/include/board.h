/*
 * The default board `rcar-virt` (docs DESIGN.md section 3).  These numbers
 * are part of the public interface: they change only together with the
 * design document.
 */
#ifndef IOMMU_LAB_BOARD_H
#define IOMMU_LAB_BOARD_H

/* ---- Guest RAM ---------------------------------------------------------- */
/* RAM starts at 0 (128 MiB by default) and stops below the device window;
 * anything beyond 160 MiB continues at 4 GiB, as on a PC. */
#define RAM_BASE                0x00000000ULL
#define RAM_LOW_LIMIT           0x0A000000ULL     /* 160 MiB */
#define RAM_HIGH_BASE           0x100000000ULL

/* ---- sysinfo (read-only, little-endian) --------------------------------- */
#define SYSINFO_BASE            0x0C000000ULL
#define SYSINFO_SIZE            0x1000
#define SYSINFO_MAGIC           0x00    /* u32 */
#define SYSINFO_RAM_SIZE        0x08    /* u64 */
#define SYSINFO_P2M_ROOT        0x10    /* u64, MPA of the concatenated L1 tables */
#define SYSINFO_VTCR            0x18    /* u32 */
#define SYSINFO_IPA_BITS        0x1C    /* u32 */
#define SYSINFO_FLAGS           0x20    /* u32 */

#define SYSINFO_MAGIC_VALUE     0x4f464e49u       /* "INFO" */
#define SYSINFO_IPA_BITS_VALUE  40
#define SYSINFO_F_DIRECT        (1u << 0)         /* GPA == MPA everywhere */
#define SYSINFO_F_NOT_DIRECT    (1u << 1)         /* exactly one is set */
#define SYSINFO_F_SECURE        (1u << 2)         /* memory private unless shared (section 7) */

/* ---- hyp: the hypercall window (DESIGN section 7) ------------------------ */
#define HYP_BASE                0x0C001000ULL
#define HYP_SIZE                0x1000
#define HYP_GPA                 0x00    /* u64 RW, 4 KiB aligned */
#define HYP_PAGES               0x08    /* u32 RW */
#define HYP_CMD                 0x0C    /* u32 WO: the command runs inside the write */
#define HYP_STATUS              0x10    /* u32 RO */
#define HYP_ADDR_BITS           0x14    /* u32 RW, default 32 (exchange) */
#define HYP_RESULT              0x18    /* u64 RO */
#define HYP_SHARED              0x20    /* u64 RO: guest pages shared now */

#define HYP_CMD_SHARE           1
#define HYP_CMD_UNSHARE         2
#define HYP_CMD_TRANSLATE       3       /* RESULT = machine address of GPA */
#define HYP_CMD_EXCHANGE        4       /* RESULT = first machine address of the contiguous run */
#define HYP_STATUS_OK           0
#define HYP_STATUS_BAD_RANGE    1       /* unaligned, not guest RAM, PAGES 0 */
#define HYP_STATUS_NOT_SECURE   2       /* share/unshare in a domain that is not secure */
#define HYP_STATUS_NO_MEMORY    3
#define HYP_STATUS_BAD_COMMAND  4       /* CMD is none of 1..4 */
#define HYP_ADDR_BITS_DEFAULT   32

/* ---- virtio-mmio transports (version 2) --------------------------------- */
#define VIRTIO_MMIO_BASE        0x0A000000ULL
#define VIRTIO_MMIO_STRIDE      0x200
#define VIRTIO_MMIO_SLOTS       8
#define VIRTIO_MMIO_SLOT(n)     (VIRTIO_MMIO_BASE + VIRTIO_MMIO_STRIDE * (unsigned long long)(n))
#define VIRTIO_MMIO_IRQ(n)      (16 + (n))
#define VIRTIO_IOMMU_SLOT       0       /* slot 0: virtio-iommu (device ID 23) */
#define VIRTIO_ID_IOMMU         23      /* empty slots read device ID 0 */

/* ---- DMA engines (little-endian) ---------------------------------------- */
#define DMA_BASE                0x0B000000ULL
#define DMA_STRIDE              0x1000
#define DMA_COUNT               5
#define DMA_ENGINE(n)           (DMA_BASE + DMA_STRIDE * (unsigned long long)(n))
#define DMA_IRQ(n)              (8 + (n))

#define DMA_ID                  0x00    /* u32 RO */
#define DMA_SRC                 0x08    /* u64 IOVA to read from */
#define DMA_DST                 0x10    /* u64 IOVA to write to */
#define DMA_LEN                 0x18    /* u32 bytes, 1 .. 1 MiB */
#define DMA_CTRL                0x1C    /* u32 */
#define DMA_STATUS              0x20    /* u32 RO */
#define DMA_FAULT_ADDR          0x28    /* u64 RO, first failing IOVA (first byte of the failing page touched) */
#define DMA_MASTER_ID           0x30    /* u32 RO, uTLB or endpoint ID */
#define DMA_IRQ_STATUS          0x34    /* u32, bit 0; write 1 to clear */
#define DMA_PASID               0x38    /* u32: [19:0] PASID, bit 31 valid (DESIGN section 6) */
#define DMA_DMA_BITS            0x3C    /* u32 RO: address lines the engine drives (section 7) */

#define DMA_ID_VALUE            0x31414d44u       /* "DMA1" */
#define DMA_LEN_MAX             (1u << 20)
#define DMA_CTRL_RUN            (1u << 0)         /* copy now, synchronously */
#define DMA_CTRL_IRQ            (1u << 1)         /* raise the IRQ when done */
#define DMA_STATUS_OK           0                 /* done / idle */
#define DMA_STATUS_XLATE_FAULT  2
#define DMA_STATUS_PERM_FAULT   3
#define DMA_STATUS_BAD_LEN      4
#define DMA_STATUS_REFUSED      5                 /* unprotected master, `fault` policy */
#define DMA_STATUS_DMA_MASK     6                 /* beyond the engine's DMA_BITS: refused */
#define DMA_STATUS_PRIVATE      7                 /* a secure guest's private page */
#define DMA_STATUS_ISOLATION    8                 /* another domain's frame (isolation = "fault") */
#define DMA_PASID_PASID         0xFFFFFu
#define DMA_PASID_VALID         (1u << 31)
#define DMA_IRQ_STATUS_RAISED   (1u << 0)

/* Topology (H3 wiring): which IOMMU and master ID sits behind each engine. */
#define DMA0_IPMMU_DS1_UTLB     32      /* dma0 -> ipmmu_ds1 uTLB 32 (SDHI0) */
#define DMA1_IPMMU_DS1_UTLB     33      /* dma1 -> ipmmu_ds1 uTLB 33 (SDHI1) */
#define DMA2_VIOMMU_ENDPOINT    2       /* dma2 -> virtio-iommu endpoint 2 */
                                        /* dma3 -> no IOMMU (board `unprotected` policy) */
#define DMA4_IPMMU_DS0_UTLB     0       /* dma4 -> ipmmu_ds0 uTLB 0 (DMAC0) */

/* ---- IPMMU-VMSA instances (register map: facts/ipmmu.md) ---------------- */
#define IPMMU_MM_BASE           0xE67B0000ULL     /* root, contexts 0..7 */
#define IPMMU_DS0_BASE          0xE6740000ULL     /* cache, 48 uTLBs */
#define IPMMU_DS1_BASE          0xE7740000ULL     /* cache, 48 uTLBs */
#define IPMMU_SIZE              0x1000
#define IPMMU_NUM_CTX           8
#define IPMMU_NUM_UTLBS         48
#define IPMMU_MM_IRQ            0       /* fault IRQ, level */

/* ---- PRR (product register) --------------------------------------------- */
#define PRR_ADDR                0xFFF00044ULL     /* 4 bytes */
#define PRR_VALUE               0x00004F20u       /* R-Car H3 ES3.0 */

#endif
