/*
 * PVH entry for iommu-lab payloads.
 *
 * The VMM (QEMU -kernel, Firecracker, cloud-hypervisor, our harness) finds
 * the 32-bit entry point in the Xen PHYS32_ENTRY ELF note below and enters
 * it in 32-bit protected mode: flat CS/DS/ES/SS, paging off, interrupts off,
 * EBX = physical address of struct hvm_start_info, no usable stack, GDT and
 * IDT unspecified.  From there we:
 *
 *   1. zero .bss (page tables and stack live there, so this comes first;
 *      rep stos needs no stack),
 *   2. load our own GDT,
 *   3. build identity-mapped page tables for 0..8 GiB with 2 MiB pages,
 *   4. enable PAE, EFER.LME and paging, far-jump into 64-bit code,
 *   5. reload the data segments, set the stack, install the IDT,
 *   6. call runtime_init(si), main(si), then exit(main's return value).
 *
 * There is deliberately no Multiboot header: QEMU would try Multiboot first
 * and refuse an x86-64 ELF carrying one instead of falling back to PVH.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define CR0_PE      (1 << 0)
#define CR0_ET      (1 << 4)
#define CR0_PG      (1 << 31)
#define CR4_PAE     (1 << 5)
#define MSR_EFER    0xC0000080
#define EFER_LME    (1 << 8)

/* 2 MiB page-directory entry: present, writable, PS (large page). */
#define PDE_2M      0x83
/* Upper-level entry: present, writable. */
#define PTE_TABLE   0x03

#define NR_PDS      8            /* 8 page directories x 1 GiB = 8 GiB */

#define SEL_CODE64  0x08
#define SEL_DATA    0x10

/* ------------------------------------------------------------------------ */
/* The PVH note.  Name and desc are 4-byte aligned as linux-loader and QEMU
 * expect; desc is the 32-bit physical address of _start32. */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz: "Xen\0" */
        .long   4                       /* descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
        .asciz  "Xen"
        .balign 4
        .long   _start32
        .balign 4

/* ------------------------------------------------------------------------ */
        .section .text.boot, "ax", @progbits
        .code32
        .globl  _start32
        .type   _start32, @function
_start32:
        cli
        cld
        /* EBX (start_info) is kept in EBX until main: nothing below uses it. */

        /* 1. Zero .bss, dword at a time (the linker script 8-aligns both ends). */
        movl    $__bss_start, %edi
        movl    $__bss_end, %ecx
        subl    %edi, %ecx
        shrl    $2, %ecx
        xorl    %eax, %eax
        rep stosl

        /* 2. Our own GDT, so that segment reloads work whatever the VMM gave. */
        lgdt    gdt_desc

        /* 3. Page tables (already zero).  PML4[0] -> PDPT; PDPT[i] -> PD i;
         * PD entries map 2 MiB each, identity, for 4096 entries = 8 GiB.
         * This covers low RAM, the device window at 0x0A000000.., the IPMMUs
         * at 0xE6xx_xxxx, PRR at 0xFFF00044 and high RAM from 4 GiB. */
        movl    $pdpt, %eax
        orl     $PTE_TABLE, %eax
        movl    %eax, pml4

        xorl    %ecx, %ecx                  /* i = 0 .. NR_PDS-1 */
1:      movl    %ecx, %eax
        shll    $12, %eax
        addl    $pds, %eax
        orl     $PTE_TABLE, %eax
        movl    %eax, pdpt(, %ecx, 8)
        incl    %ecx
        cmpl    $NR_PDS, %ecx
        jb      1b

        xorl    %ecx, %ecx                  /* j = 0 .. 512*NR_PDS-1 */
2:      movl    %ecx, %eax
        shll    $21, %eax                   /* low 32 bits of j * 2 MiB */
        orl     $PDE_2M, %eax
        movl    %eax, pds(, %ecx, 8)
        movl    %ecx, %edx
        shrl    $11, %edx                   /* high 32 bits of j * 2 MiB */
        movl    %edx, pds+4(, %ecx, 8)
        incl    %ecx
        cmpl    $(512 * NR_PDS), %ecx
        jb      2b

        /* 4. Long mode: PAE, CR3, EFER.LME, then paging. */
        movl    %cr4, %eax
        orl     $CR4_PAE, %eax
        movl    %eax, %cr4

        movl    $pml4, %eax
        movl    %eax, %cr3

        movl    $MSR_EFER, %ecx
        rdmsr
        orl     $EFER_LME, %eax
        wrmsr

        movl    $(CR0_PG | CR0_ET | CR0_PE), %eax
        movl    %eax, %cr0

        ljmp    $SEL_CODE64, $_start64

        .size   _start32, . - _start32

/* ------------------------------------------------------------------------ */
        .code64
        .type   _start64, @function
_start64:
        /* 5. Data segments from our GDT (base/limit ignored in long mode, but
         * stale selectors would fault on the next reload or iretq). */
        movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs

        leaq    stack_top(%rip), %rsp       /* 16-byte aligned */
        xorl    %ebp, %ebp

        /* 6. C runtime.  EBX was preserved; zero-extend it into the arg. */
        movl    %ebx, %edi
        call    runtime_init                /* IDT, start_info, allocator */
        movl    %ebx, %edi
        call    main
        movl    %eax, %edi
        call    exit
        .size   _start64, . - _start64

/* ------------------------------------------------------------------------ */
/* Interrupt/exception stubs: 256 of them, each 16 bytes, at isr_stubs +
 * 16 * vector (trap.c computes the IDT gates from that).  Each pushes a dummy
 * error code when the CPU does not push one, then the vector, so that every
 * frame has the same layout (struct trap_frame in runtime.h). */
        .balign 16
        .globl  isr_stubs
isr_stubs:
        .set    vec, 0
        .rept   256
        .balign 16
        .if !((vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30))
        pushq   $0
        .endif
        pushq   $vec
        jmp     isr_common
        .set    vec, vec + 1
        .endr

isr_common:
        pushq   %rax
        pushq   %rbx
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %rbp
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        pushq   %r12
        pushq   %r13
        pushq   %r14
        pushq   %r15
        /* The CPU aligned RSP to 16 before its 5-qword frame; 2 + 15 qwords
         * more keep it aligned (22 * 8 = 176), as the SysV ABI wants at a call. */
        movq    %rsp, %rdi
        cld
        call    trap_handler
        popq    %r15
        popq    %r14
        popq    %r13
        popq    %r12
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rbp
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rbx
        popq    %rax
        addq    $16, %rsp                   /* vector + error code */
        iretq

/* ------------------------------------------------------------------------ */
/* Deliberate triple fault: with a zero-limit IDT, the divide error cannot
 * be delivered (#GP), nor can that #GP (#DF), nor the #DF: the CPU shuts
 * down.  The VMM sees a shutdown (KVM_EXIT_SHUTDOWN; QEMU resets, or exits
 * under -no-reboot).  A hardware fault (#DE) is used on purpose: a software
 * interrupt (int3, int n) through a bad IDT made KVM on a nested host fail
 * with "KVM internal error. Suberror: 1" (emulation) instead of shutting
 * down.  ud2 follows as a second attempt, should #DE ever be survivable. */
        .globl  triple_fault
        .type   triple_fault, @function
triple_fault:
        cli
        lidt    null_idt_desc(%rip)
        xorl    %ecx, %ecx
        divl    %ecx
        ud2
1:      hlt
        jmp     1b
        .size   triple_fault, . - triple_fault

/* ------------------------------------------------------------------------ */
        .section .data
        .balign 16
gdt:
        .quad   0                           /* null */
        .quad   0x00af9a000000ffff          /* 0x08: 64-bit code, DPL 0 */
        .quad   0x00cf92000000ffff          /* 0x10: flat data, DPL 0 */
gdt_end:

        /* lgdt in 32-bit mode reads a 16-bit limit and a 32-bit base. */
        .balign 8
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

null_idt_desc:
        .word   0
        .quad   0

/* ------------------------------------------------------------------------ */
        .section .bss
        .balign 4096
pml4:   .skip   4096
pdpt:   .skip   4096
pds:    .skip   4096 * NR_PDS

        .balign 16
stack:  .skip   64 * 1024
stack_top:

        .section .note.GNU-stack, "", @progbits
