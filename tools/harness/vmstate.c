/*
 * The snapshot seam: vm_state_save() / vm_state_restore().
 *
 * Phase 1 implements them with raw KVM ioctls into an in-memory
 * struct vm_state.  The snapfmt shim will replace these two functions (same
 * signatures, or a thin wrapper around its own) so that the state goes
 * through snapfmt sections instead.  Everything else in snapvm (RAM, run
 * loop, UART) stays as is.
 *
 * Restore order follows Firecracker/QEMU practice: VM-wide state (PIT,
 * clock, irqchips) first, then per vCPU: CPUID, MP state, REGS, SREGS,
 * XSAVE, XCRS, DEBUGREGS, LAPIC, MSRs (after LAPIC: TSC_DEADLINE depends on
 * it), VCPU_EVENTS last.
 */
#include "vm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#define CHK(fd, req, arg, name)                                           \
	do {                                                              \
		if (xioctl((fd), (req), (arg)) < 0)                       \
			return fail("%s: %s", (name), strerror(errno));   \
	} while (0)

static int get_msrs(struct vm *vm, struct vm_state *st)
{
	size_t sz = sizeof(struct kvm_msrs) + vm->nmsr_idx * sizeof(struct kvm_msr_entry);
	struct kvm_msrs *m = calloc(1, sz);
	if (!m)
		return fail("out of memory");
	m->nmsrs = vm->nmsr_idx;
	for (uint32_t i = 0; i < vm->nmsr_idx; i++)
		m->entries[i].index = vm->msr_idx[i];
	int r = ioctl(vm->vcpu_fd, KVM_GET_MSRS, m);
	if (r != (int)vm->nmsr_idx) {
		int e = errno;
		free(m);
		if (r < 0)
			return fail("KVM_GET_MSRS: %s", strerror(e));
		return fail("KVM_GET_MSRS: read %d of %u (stopped at 0x%x)", r,
			    vm->nmsr_idx, vm->msr_idx[r]);
	}
	st->nmsrs = vm->nmsr_idx;
	memcpy(st->msrs, m->entries, st->nmsrs * sizeof(struct kvm_msr_entry));
	free(m);
	return 0;
}

static int set_msrs(struct vm *vm, const struct vm_state *st)
{
	size_t sz = sizeof(struct kvm_msrs) + st->nmsrs * sizeof(struct kvm_msr_entry);
	struct kvm_msrs *m = calloc(1, sz);
	if (!m)
		return fail("out of memory");
	m->nmsrs = st->nmsrs;
	memcpy(m->entries, st->msrs, st->nmsrs * sizeof(struct kvm_msr_entry));
	int r = ioctl(vm->vcpu_fd, KVM_SET_MSRS, m);
	int e = errno;
	free(m);
	if (r != (int)st->nmsrs) {
		if (r < 0)
			return fail("KVM_SET_MSRS: %s", strerror(e));
		return fail("KVM_SET_MSRS: wrote %d of %u (rejected 0x%x)", r,
			    st->nmsrs, st->msrs[r].index);
	}
	return 0;
}

static int get_irqchip(struct vm *vm, uint32_t id, struct kvm_irqchip *c, const char *name)
{
	memset(c, 0, sizeof(*c));
	c->chip_id = id;
	CHK(vm->vm_fd, KVM_GET_IRQCHIP, c, name);
	return 0;
}

int vm_state_save(struct vm *vm, struct vm_state *st)
{
	memset(st, 0, sizeof(*st));

	/* VM-wide */
	CHK(vm->vm_fd, KVM_GET_PIT2, &st->pit, "KVM_GET_PIT2");
	CHK(vm->vm_fd, KVM_GET_CLOCK, &st->clock, "KVM_GET_CLOCK");
	if (get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, &st->pic_master, "KVM_GET_IRQCHIP(pic master)") ||
	    get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, &st->pic_slave, "KVM_GET_IRQCHIP(pic slave)") ||
	    get_irqchip(vm, KVM_IRQCHIP_IOAPIC, &st->ioapic, "KVM_GET_IRQCHIP(ioapic)"))
		return -1;

	/* vCPU */
	struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + SNAP_MAX_CPUID * sizeof(c->entries[0]));
	if (!c)
		return fail("out of memory");
	c->nent = SNAP_MAX_CPUID;
	if (ioctl(vm->vcpu_fd, KVM_GET_CPUID2, c) < 0) {
		free(c);
		return fail("KVM_GET_CPUID2: %s", strerror(errno));
	}
	st->ncpuid = c->nent;
	memcpy(st->cpuid, c->entries, c->nent * sizeof(c->entries[0]));
	free(c);

	CHK(vm->vcpu_fd, KVM_GET_MP_STATE, &st->mp_state, "KVM_GET_MP_STATE");
	CHK(vm->vcpu_fd, KVM_GET_REGS, &st->regs, "KVM_GET_REGS");
	CHK(vm->vcpu_fd, KVM_GET_SREGS, &st->sregs, "KVM_GET_SREGS");
	if (vm->xsave_size > 4096)
		CHK(vm->vcpu_fd, KVM_GET_XSAVE2, st->xsave, "KVM_GET_XSAVE2");
	else
		CHK(vm->vcpu_fd, KVM_GET_XSAVE, st->xsave, "KVM_GET_XSAVE");
	st->xsave_size = vm->xsave_size;
	CHK(vm->vcpu_fd, KVM_GET_XCRS, &st->xcrs, "KVM_GET_XCRS");
	CHK(vm->vcpu_fd, KVM_GET_DEBUGREGS, &st->debugregs, "KVM_GET_DEBUGREGS");
	CHK(vm->vcpu_fd, KVM_GET_LAPIC, &st->lapic, "KVM_GET_LAPIC");
	if (get_msrs(vm, st) < 0)
		return -1;
	CHK(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &st->events, "KVM_GET_VCPU_EVENTS");

	/* devices */
	uart_get_state(&vm->uart, &st->uart);
	st->ram_size = vm->ram.size;
	return 0;
}

int vm_state_restore(struct vm *vm, const struct vm_state *st)
{
	if (st->ram_size != vm->ram.size)
		return fail("restore: RAM size %zu != snapshot %llu", vm->ram.size,
			    (unsigned long long)st->ram_size);
	if (st->xsave_size > vm->xsave_size)
		return fail("restore: XSAVE area %u > KVM's %u", st->xsave_size, vm->xsave_size);

	/* VM-wide */
	struct kvm_pit_state2 pit = st->pit;
	CHK(vm->vm_fd, KVM_SET_PIT2, &pit, "KVM_SET_PIT2");
	struct kvm_clock_data clock = st->clock;
	clock.flags = 0; /* GET returns e.g. 0xe; SET rejects unknown flags */
	CHK(vm->vm_fd, KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK");
	struct kvm_irqchip chip = st->pic_master;
	CHK(vm->vm_fd, KVM_SET_IRQCHIP, &chip, "KVM_SET_IRQCHIP(pic master)");
	chip = st->pic_slave;
	CHK(vm->vm_fd, KVM_SET_IRQCHIP, &chip, "KVM_SET_IRQCHIP(pic slave)");
	chip = st->ioapic;
	CHK(vm->vm_fd, KVM_SET_IRQCHIP, &chip, "KVM_SET_IRQCHIP(ioapic)");

	/* vCPU */
	if (st->ncpuid > SNAP_MAX_CPUID)
		return fail("restore: %u CPUID entries", st->ncpuid);
	struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + st->ncpuid * sizeof(c->entries[0]));
	if (!c)
		return fail("out of memory");
	c->nent = st->ncpuid;
	memcpy(c->entries, st->cpuid, st->ncpuid * sizeof(c->entries[0]));
	int r = ioctl(vm->vcpu_fd, KVM_SET_CPUID2, c);
	int e = errno;
	free(c);
	if (r < 0)
		return fail("KVM_SET_CPUID2: %s", strerror(e));

	struct kvm_mp_state mp = st->mp_state;
	CHK(vm->vcpu_fd, KVM_SET_MP_STATE, &mp, "KVM_SET_MP_STATE");
	struct kvm_regs regs = st->regs;
	CHK(vm->vcpu_fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
	struct kvm_sregs sregs = st->sregs;
	CHK(vm->vcpu_fd, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	CHK(vm->vcpu_fd, KVM_SET_XSAVE, (void *)st->xsave, "KVM_SET_XSAVE");
	struct kvm_xcrs xcrs = st->xcrs;
	CHK(vm->vcpu_fd, KVM_SET_XCRS, &xcrs, "KVM_SET_XCRS");
	struct kvm_debugregs dr = st->debugregs;
	CHK(vm->vcpu_fd, KVM_SET_DEBUGREGS, &dr, "KVM_SET_DEBUGREGS");
	struct kvm_lapic_state lapic = st->lapic;
	CHK(vm->vcpu_fd, KVM_SET_LAPIC, &lapic, "KVM_SET_LAPIC");
	if (set_msrs(vm, st) < 0)
		return -1;
	struct kvm_vcpu_events ev = st->events;
	CHK(vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &ev, "KVM_SET_VCPU_EVENTS");

	/* devices */
	uart_set_state(&vm->uart, &st->uart);
	return 0;
}
