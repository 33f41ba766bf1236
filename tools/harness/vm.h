/* snapvm: minimal KVM VMM (one vCPU, in-kernel irqchip + PIT, COM1). */
#ifndef SNAPVM_VM_H
#define SNAPVM_VM_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "uart.h"

#define GUEST_LOAD_ADDR 0x100000UL   /* guest.bin is loaded flat here */
#define GUEST_HDR_OFF   0x40         /* "SNAPGST1", entry64, end, flags */
/* Header flag: the guest may use AVX (if CPUID has it).  Off by default:
   under kvm_pvm every VEX/xgetbv/xsave instruction in the guest ends in
   KVM_EXIT_INTERNAL_ERROR (emulation failure), and CPUID masking via
   KVM_SET_CPUID2 is not honoured for leaf 1, so the guest can't be told
   through CPUID. */
#define GUEST_FLAG_AVX  1ULL
#define BOOT_GDT_ADDR   0x500UL
#define PT_BASE         0x9000UL     /* PML4, PDPT, 4 PDs (2 MiB pages) */
#define MEM_MIN         (8UL << 20)
#define MEM_MAX         (3UL << 30)  /* stay below the 32-bit MMIO hole */

/* Report an error with context; returns -1 so callers can `return fail(..)` */
int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* ioctl that retries EINTR/EAGAIN a bounded number of times */
int xioctl(int fd, unsigned long req, void *arg);
uint64_t now_ns(void);

/* ------------------------------------------------------------ guest RAM */
struct guest_ram {
	uint8_t *host;   /* mapping */
	size_t size;
	int fd;          /* backing fd (memfd or file), -1 once closed */
	int is_private;  /* MAP_PRIVATE (copy-on-write child) */
};

/* New anonymous RAM: memfd, MAP_SHARED, zero filled. */
int ram_create_memfd(struct guest_ram *ram, size_t size);
/* Copy-on-write view of fd[off, off+size) (memfd of a frozen template, or a
   RAM file): MAP_PRIVATE, guest writes stay private to this mapping.  The
   fd is dup'ed; the caller keeps ownership of its own fd. */
int ram_map_private(struct guest_ram *ram, int fd, off_t off, size_t size);
/* Close the backing fd but keep the mapping (mapping keeps the file alive). */
void ram_drop_fd(struct guest_ram *ram);
void ram_release(struct guest_ram *ram);

/* ------------------------------------------------------------ snapshot */
#define SNAP_MAX_MSRS   128
#define SNAP_MAX_CPUID  128
#define SNAP_XSAVE_MAX  16384

/*
 * Everything needed to resume the VM apart from RAM.  In phase 1 this lives
 * in memory; the shim replaces vm_state_save/vm_state_restore with the
 * snapfmt sections.  Field order follows the restore order.
 */
struct vm_state {
	/* VM-wide */
	struct kvm_pit_state2 pit;
	struct kvm_clock_data clock;
	struct kvm_irqchip pic_master, pic_slave, ioapic;
	/* vCPU */
	uint32_t ncpuid;
	struct kvm_cpuid_entry2 cpuid[SNAP_MAX_CPUID];
	struct kvm_mp_state mp_state;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	uint32_t xsave_size;                /* bytes valid in xsave[] */
	uint8_t xsave[SNAP_XSAVE_MAX] __attribute__((aligned(64)));
	struct kvm_xcrs xcrs;
	struct kvm_debugregs debugregs;
	struct kvm_lapic_state lapic;
	uint32_t nmsrs;
	struct kvm_msr_entry msrs[SNAP_MAX_MSRS];
	struct kvm_vcpu_events events;
	/* devices */
	struct uart_state uart;
	uint64_t ram_size;
};

/* ------------------------------------------------------------ VM */
struct vm {
	int kvm_fd, vm_fd, vcpu_fd;
	struct kvm_run *run;
	size_t run_size;
	struct guest_ram ram;
	struct uart uart;
	uint32_t xsave_size;               /* KVM_CAP_XSAVE2 or 4096 */
	/* MSRs that round-trip (index list minus feature MSRs, probed) */
	uint32_t nmsr_idx;
	uint32_t msr_idx[SNAP_MAX_MSRS];

	/* run control */
	pthread_t vcpu_thread;
	int vcpu_thread_live;
	atomic_int pause_req;   /* ask the vCPU loop to stop (pause) */
	atomic_int exited;      /* vCPU loop finished (paused or died) */
	atomic_int failed;      /* guest/VMM fatal error */
	int pause_on_ready;     /* pause right after the guest prints READY */
	atomic_int ready_seen;

	/* serial input pump */
	int in_fd;              /* -1 = none */
	pthread_t io_thread;
	int io_thread_live;
	atomic_int io_stop;
	atomic_int in_eof;

	int verbose;
	int allow_avx;          /* set GUEST_FLAG_AVX in the guest header */
	int for_restore;        /* vm_create: skip the boot CPUID and the MSR
				   probe (the snapshot's CPUID2/MSRS are set) */
	/* vm_create calls this (if set) right after KVM_CREATE_VM, before
	   KVM_CREATE_IRQCHIP: registering guest memory before the in-kernel
	   irqchip exists makes KVM_SET_USER_MEMORY_REGION ~0.1 ms instead of
	   ~7.6 ms for 256 MiB on this host (measured, bench/bench_kvm.py). */
	int (*pre_irqchip)(struct vm *vm, void *arg);
	void *pre_irqchip_arg;
};

/* Create VM + vCPU fds (irqchip, PIT, CPUID), no RAM yet.  Opens /dev/kvm
   if vm->kvm_fd < 0. */
int vm_create(struct vm *vm);
/* Register vm->ram as slot 0 at GPA 0. */
int vm_attach_ram(struct vm *vm);
/* Load guest.bin, build page tables + GDT, set long mode vCPU state. */
int vm_boot_setup(struct vm *vm, const char *image_path);
/* Close all fds / mappings of the VM (RAM too). Safe on partial VMs. */
void vm_destroy(struct vm *vm);

/* Start the vCPU thread (and the serial pump if in_fd >= 0). */
int vm_start(struct vm *vm);
/* Stop the vCPU thread at an instruction boundary with no half-done I/O
   (immediate_exit re-entry), and join it.  Also stops the serial pump. */
int vm_pause(struct vm *vm);
/* Wait (bounded) for the vCPU loop to end by itself (pause_on_ready or
   failure).  Returns 0 if it ended, -1 on timeout. */
int vm_wait_exited(struct vm *vm, int timeout_ms);
void vm_stop_io(struct vm *vm);

/* ---- the seam the snapfmt shim replaces ---- */
/* Save vCPU + VM + device state of a paused VM. */
int vm_state_save(struct vm *vm, struct vm_state *st);
/* Restore st into a freshly created VM (vm_create + vm_attach_ram done,
   vCPU never run). */
int vm_state_restore(struct vm *vm, const struct vm_state *st);

#endif
