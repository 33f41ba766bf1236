/* SPDX-License-Identifier: MIT */
/*
 * snapfmt_kvm.h -- KVM capture/restore helpers over the snapfmt reader/writer.
 *
 * These are the calls a VMM (our libkrun fork, tools/harness/snapvm) makes to
 * snapshot a paused x86_64 VM and to restore it into fresh VM/vCPU fds.  The
 * section bytes are the KVM UAPI structs themselves, so no conversion happens.
 *
 * Orders (spec/FORMAT.md 6.2, normative):
 *   save, per vCPU:  MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC,
 *                    VCPU_EVENTS, MSRS, CPUID2, TSC_KHZ
 *   save, VM:        PIT2, CLOCK, PIC master, PIC slave, IOAPIC
 *   restore, vCPU:   CPUID2, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS,
 *                    LAPIC, MSRS (IA32_TSC before TSC_DEADLINE), VCPU_EVENTS
 *   restore, VM:     PIT2, CLOCK (flags cleared), PIC master, slave, IOAPIC
 *   (the VMM restores the VM state after all vCPUs)
 *
 * snapfmt_kvm_restore_ram() refuses (SNAPFMT_ERR_CHANGED) a reader that was
 * not opened with snapfmt_kvm_open(): only then does the shim hold the
 * file's identity to re-check before mapping it into a child.
 *
 * Pausing: a vCPU that exited for port I/O must be re-entered once with
 * kvm_run->immediate_exit = 1 before its state is read, or the IN/OUT is left
 * half done -- snapfmt_kvm_pause_vcpu() does that.
 *
 * RAM: snapfmt_kvm_save_ram() writes a memfd (or any fd) region as a RAM
 * section (zero pages become holes) and records it in the memory layout;
 * snapfmt_kvm_restore_ram() maps every region MAP_PRIVATE from the snapshot
 * file and registers it with KVM_SET_USER_MEMORY_REGION, after refusing a
 * backing file that can change under its children (writable by anyone, or
 * identity different from the one recorded).
 *
 * All functions return 0 or a negative SNAPFMT_ERR_* (SNAPFMT_ERR_KVM: an
 * ioctl failed, errno says why; snapfmt_kvm_last_ioctl() names it).
 */
#ifndef SNAPFMT_KVM_H
#define SNAPFMT_KVM_H

#include <stdint.h>

#include "snapfmt.h"

#ifdef __cplusplus
extern "C" {
#endif

struct kvm_run;

/* Upper bound on MSRs saved per vCPU. */
#define SNAPFMT_KVM_MAX_MSRS 256

/* MSRs to save: KVM_GET_MSR_INDEX_LIST on the system fd, minus the ones that
 * cannot be restored from their read-back value (feature MSRs such as
 * IA32_ARCH_CAPABILITIES 0x10a come from KVM_GET_MSR_FEATURE_INDEX_LIST and are
 * excluded).  Writes at most cap indices into out, the count into *n. */
int snapfmt_kvm_msr_list(int kvm_fd, uint32_t *out, uint32_t cap, uint32_t *n);

/* Finish a pending PIO/MMIO exit (immediate_exit re-entry) so the vCPU state
 * is consistent; run is the vCPU's mmap'ed kvm_run. */
int snapfmt_kvm_pause_vcpu(int vcpu_fd, struct kvm_run *run);

/* Save one vCPU (instance = index) in the documented order.  msrs/n_msrs from
 * snapfmt_kvm_msr_list(). */
int snapfmt_kvm_save_vcpu(struct snapfmt_writer *w, int vcpu_fd, uint32_t index,
			  const uint32_t *msrs, uint32_t n_msrs);
/* Save the VM-wide state (PIT2, CLOCK, PIC x2, IOAPIC). */
int snapfmt_kvm_save_vm(struct snapfmt_writer *w, int vm_fd);

/* Guest RAM region to save / restored mapping. */
struct snapfmt_kvm_ram {
	uint64_t gpa;     /* guest physical address */
	uint64_t size;    /* bytes */
	void *host;       /* restore: the MAP_PRIVATE mapping (munmap it yourself) */
	uint32_t slot;    /* restore: the KVM memory slot used */
};

/* Write the RAM regions (each backed by fd at the given offset, e.g. a memfd)
 * as RAM sections plus the memory layout section. */
int snapfmt_kvm_save_ram(struct snapfmt_writer *w, int fd, const uint64_t *fd_offsets,
			 const struct snapfmt_kvm_ram *regions, uint32_t n);

/* Refuse a snapshot whose RAM file can change under its children:
 * SNAPFMT_ERR_CHANGED when the file is writable by anyone (mode & 0222) or, for
 * a memfd, lacks F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW. */
int snapfmt_kvm_check_immutable(int fd);

/* Map every memory region of r MAP_PRIVATE from the file and register it with
 * KVM (slots first_slot, first_slot+1, ...).  Fills out[0..*n).
 * Call it right after KVM_CREATE_VM, BEFORE KVM_CREATE_IRQCHIP and
 * KVM_CREATE_VCPU: measured on the kvm_pvm host, KVM_SET_USER_MEMORY_REGION
 * of 256 MiB takes ~0.1 ms on a VM without an in-kernel irqchip and ~7.6 ms
 * once the irqchip exists (bench/bench_kvm.py prints both). */
int snapfmt_kvm_restore_ram(const struct snapfmt_reader *r, int vm_fd, uint32_t first_slot,
			    struct snapfmt_kvm_ram *out, uint32_t cap, uint32_t *n);

/* Restore one vCPU / the VM state into fresh fds, in the documented order. */
int snapfmt_kvm_restore_vcpu(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index);
int snapfmt_kvm_restore_vm(const struct snapfmt_reader *r, int vm_fd);

/* Name of the last ioctl that failed in this thread ("KVM_SET_SREGS"), or "". */
const char *snapfmt_kvm_last_ioctl(void);

/* ---- additions (issue 4) ----------------------------------------------------
 * One-line description of the last failure in this thread, naming the ioctl,
 * section and vCPU ("vCPU 0: KVM_SET_MSRS wrote 3 of 40 entries, rejected MSR
 * 0x6e0"), or "". */
const char *snapfmt_kvm_last_error(void);
/* Non-fatal findings of the last restore in this thread (e.g. "TSC 2100000 kHz
 * in the snapshot, 2400000 kHz here, KVM_CAP_TSC_CONTROL unavailable: guest
 * time runs at the host rate"), or "". */
const char *snapfmt_kvm_last_note(void);

/* Write the ANCILLARY metadata section: now (CLOCK_REALTIME ns) as
 * created_unix_ns, producer/version, uname release, CPUID vendor/brand, then
 * nkv key/value pairs (kv[2i] = key, kv[2i+1] = value).  The created time is
 * what snapfmt_kvm_seal() later sets as the file's mtime.  *created_ns may be
 * NULL. */
int snapfmt_kvm_save_metadata(struct snapfmt_writer *w, const char *producer,
			      const char *producer_version, const char *const *kv, uint32_t nkv,
			      uint64_t *created_ns);

/* After snapfmt_writer_commit(): make the snapshot file immutable for the
 * restore-time check -- chmod 0444 and set its mtime to the metadata's
 * created_unix_ns (the "seal" recorded in the file). */
int snapfmt_kvm_seal(const char *path);

/* Open a snapshot for restore: snapfmt_open_diag() of exactly the inode
 * opened here (no path race) plus the immutability check below; keeps an fd
 * and the identity (dev, ino, size, mtime, ctime) seen at open so that
 * snapfmt_kvm_restore_ram() can re-check it for every child.  Close with
 * snapfmt_kvm_close().  SNAPFMT_ERR_CHANGED: writable by anyone (mode &
 * 0222), or mtime != the sealed created_unix_ns of the metadata section
 * (modified in place after the snapshot, or a copy not re-sealed). */
int snapfmt_kvm_open(const char *path, unsigned flags, struct snapfmt_reader **out,
		     struct snapfmt_diag *diag);
void snapfmt_kvm_close(struct snapfmt_reader *r);

#ifdef __cplusplus
}
#endif
#endif /* SNAPFMT_KVM_H */
