/* SPDX-License-Identifier: MIT */
/*
 * snapfmt_kvm.c -- x86_64 KVM capture/restore over the snapfmt reader/writer
 * (API and orders: snapfmt_kvm.h, spec/FORMAT.md 6.2).
 *
 * Every ioctl goes through kio(), which retries EINTR/EAGAIN a bounded number
 * of times and on failure records the ioctl name (snapfmt_kvm_last_ioctl) and
 * a one-line message (snapfmt_kvm_last_error); errno is left as the kernel set
 * it.  No fd or mapping outlives a failed call.
 */
#define _GNU_SOURCE
#include "snapfmt_kvm.h"

#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define MSR_IA32_TSC 0x10u
#define MSR_IA32_TSC_DEADLINE 0x6e0u
#define MSR_IA32_ARCH_CAPABILITIES 0x10au
#define MSR_SET_CHUNK 255u          /* KVM_SET_MSRS calls stay below 256 entries */
#define CPUID_MAX 256u              /* tables.md limit for x86.cpuid2 */
#define MEMREG_SIZE 96u             /* memory_layout region record */
#define MEMLAYOUT_HDR 8u

/* memory_layout region record offsets (snapfmt/sections_core.py MemoryRegion) */
enum {
	MR_GPA = 0, MR_SIZE = 8, MR_BACKING = 16, MR_FLAGS = 20, MR_INSTANCE = 24,
	MR_NAME_LEN = 28, MR_NAME_OFF = 32, MR_FILE_OFF = 40, MR_FILE_SIZE = 48,
	MR_RESERVED = 56, MR_SHA256 = 64,
};
#define MEM_BACKING_SECTION 0u
#define MEM_BACKING_FILE 1u
#define MEM_BACKING_ZERO 2u
#define MEM_F_READONLY 1u

_Static_assert(sizeof(struct kvm_msr_entry) == 16, "kvm_msr_entry");
_Static_assert(sizeof(struct kvm_cpuid_entry2) == 40, "kvm_cpuid_entry2");
_Static_assert(sizeof(struct kvm_irqchip) == 520, "kvm_irqchip");
_Static_assert(MR_SHA256 + 32 == MEMREG_SIZE, "memory region record");

static _Thread_local const char *t_last_ioctl = "";
static _Thread_local char t_last_error[320];
static _Thread_local char t_last_note[320];

const char *snapfmt_kvm_last_ioctl(void) { return t_last_ioctl; }
const char *snapfmt_kvm_last_error(void) { return t_last_error; }
const char *snapfmt_kvm_last_note(void) { return t_last_note; }

__attribute__((format(printf, 2, 3))) static int err_msg(int code, const char *fmt, ...)
{
	int saved = errno;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(t_last_error, sizeof(t_last_error), fmt, ap);
	va_end(ap);
	errno = saved;
	return code;
}

static void clear_errors(void)
{
	t_last_ioctl = "";
	t_last_error[0] = '\0';
}

/* ioctl with bounded EINTR/EAGAIN retry; on failure records the name. */
static int kio(int fd, unsigned long req, void *arg, const char *name, int vcpu)
{
	int r = -1;

	for (int i = 0; i < 1000; i++) {
		r = ioctl(fd, req, arg);
		if (r >= 0 || (errno != EINTR && errno != EAGAIN))
			break;
	}
	if (r >= 0)
		return r;
	t_last_ioctl = name;
	if (vcpu >= 0)
		err_msg(0, "vCPU %d: %s: %s", vcpu, name, strerror(errno));
	else
		err_msg(0, "%s: %s", name, strerror(errno));
	return SNAPFMT_ERR_KVM;
}

static const char *sec_name(uint32_t type)
{
	const char *n = snapfmt_type_name(type);
	return n ? n : "?";
}

/* ------------------------------------------------------------ system values */
static pthread_once_t sys_once = PTHREAD_ONCE_INIT;
static uint32_t sys_xsave_size = sizeof(struct kvm_xsave); /* KVM_CAP_XSAVE2 or 4096 */
static int sys_tsc_control;

static void sys_probe(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return;
	int xs = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (xs > (int)sizeof(struct kvm_xsave))
		sys_xsave_size = (uint32_t)xs;
	sys_tsc_control = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_CONTROL) > 0;
	close(fd);
}

static uint32_t xsave_size(void)
{
	pthread_once(&sys_once, sys_probe);
	return sys_xsave_size;
}

/* ------------------------------------------------------------ MSR list */
static int get_list(int fd, unsigned long req, const char *name, struct kvm_msr_list **out)
{
	struct kvm_msr_list probe = {.nmsrs = 0};
	struct kvm_msr_list *l;

	*out = NULL;
	if (ioctl(fd, req, &probe) < 0 && errno != E2BIG) {
		t_last_ioctl = name;
		return err_msg(SNAPFMT_ERR_KVM, "%s: %s", name, strerror(errno));
	}
	l = calloc(1, sizeof(*l) + (probe.nmsrs + 1) * sizeof(uint32_t));
	if (!l)
		return err_msg(SNAPFMT_ERR_NOMEM, "%s: out of memory", name);
	l->nmsrs = probe.nmsrs;
	if (kio(fd, req, l, name, -1) < 0) {
		free(l);
		return SNAPFMT_ERR_KVM;
	}
	*out = l;
	return 0;
}

int snapfmt_kvm_msr_list(int kvm_fd, uint32_t *out, uint32_t cap, uint32_t *n)
{
	struct kvm_msr_list *idx = NULL, *feat = NULL;
	int err;

	clear_errors();
	if (!out || !n)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_msr_list: NULL argument");
	*n = 0;
	err = get_list(kvm_fd, KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST", &idx);
	if (err)
		return err;
	/* optional: older kernels lack it */
	if (get_list(kvm_fd, KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST",
		     &feat) < 0)
		clear_errors();
	for (uint32_t i = 0; i < idx->nmsrs; i++) {
		uint32_t m = idx->indices[i];
		int skip = m == MSR_IA32_ARCH_CAPABILITIES;

		for (uint32_t j = 0; feat && j < feat->nmsrs && !skip; j++)
			skip = feat->indices[j] == m;
		if (skip)
			continue;
		if (*n >= cap) {
			err = err_msg(SNAPFMT_ERR_LIMIT, "MSR index list has more than %u savable MSRs",
				      cap);
			break;
		}
		out[(*n)++] = m;
	}
	free(idx);
	free(feat);
	return err;
}

/* ------------------------------------------------------------ pause */
int snapfmt_kvm_pause_vcpu(int vcpu_fd, struct kvm_run *run)
{
	int r, e;

	clear_errors();
	if (!run)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_pause_vcpu: NULL kvm_run");
	run->immediate_exit = 1;
	r = ioctl(vcpu_fd, KVM_RUN, 0);
	e = errno;
	run->immediate_exit = 0;
	if (r == 0 || e == EINTR || e == EAGAIN)
		return 0;
	t_last_ioctl = "KVM_RUN";
	errno = e;
	return err_msg(SNAPFMT_ERR_KVM, "KVM_RUN (immediate_exit re-entry): %s", strerror(e));
}

/* ------------------------------------------------------------ save */
static int add(struct snapfmt_writer *w, uint32_t type, uint32_t inst, const void *buf,
	       uint64_t len)
{
	int err = snapfmt_writer_add(w, type, inst, SNAPFMT_SEC_F_CRITICAL, 1, buf, len);

	if (err)
		return err_msg(err, "writing %s[%u]: %s", sec_name(type), inst,
			       snapfmt_strerror(err));
	return 0;
}

#define SAVE_FIXED(ioc, type, T, name)                                             \
	do {                                                                       \
		T v_;                                                              \
		memset(&v_, 0, sizeof(v_));                                        \
		if (kio(vcpu_fd, ioc, &v_, name, (int)index) < 0)                  \
			return SNAPFMT_ERR_KVM;                                    \
		if ((err = add(w, type, index, &v_, sizeof(v_))))                 \
			return err;                                                \
	} while (0)

static int save_xsave(struct snapfmt_writer *w, int vcpu_fd, uint32_t index)
{
	uint32_t size = xsave_size();
	void *buf;
	int err;

	if (posix_memalign(&buf, 64, size))
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (xsave %u bytes)", size);
	memset(buf, 0, size);
	if (size > sizeof(struct kvm_xsave))
		err = kio(vcpu_fd, KVM_GET_XSAVE2, buf, "KVM_GET_XSAVE2", (int)index);
	else
		err = kio(vcpu_fd, KVM_GET_XSAVE, buf, "KVM_GET_XSAVE", (int)index);
	if (err >= 0)
		err = add(w, SNAPFMT_SEC_X86_XSAVE, index, buf, size);
	free(buf);
	return err < 0 ? err : 0;
}

static int save_msrs(struct snapfmt_writer *w, int vcpu_fd, uint32_t index,
		     const uint32_t *msrs, uint32_t n)
{
	size_t sz = sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry);
	struct kvm_msrs *m = calloc(1, sz), *one = calloc(1, sizeof(*one) + sizeof(one->entries[0]));
	uint32_t got = 0;
	int err = 0;

	if (!m || !one) {
		free(m);
		free(one);
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (%u MSRs)", n);
	}
	/* one batch; an MSR this vCPU cannot read (KVM stops at it) is dropped
	   and the rest read on: the saved set is what round-trips */
	for (uint32_t i = 0; i < n; i++)
		m->entries[i].index = msrs[i];
	m->nmsrs = n;
	int r = kio(vcpu_fd, KVM_GET_MSRS, m, "KVM_GET_MSRS", (int)index);
	if (r < 0) {
		err = SNAPFMT_ERR_KVM;
		goto out;
	}
	if ((uint32_t)r == n) {
		got = n;
	} else {
		for (uint32_t i = 0; i < n; i++) {
			one->nmsrs = 1;
			one->entries[0].index = msrs[i];
			one->entries[0].data = 0;
			if (ioctl(vcpu_fd, KVM_GET_MSRS, one) == 1)
				m->entries[got++] = one->entries[0];
		}
	}
	m->nmsrs = got;
	m->pad = 0;
	err = add(w, SNAPFMT_SEC_X86_MSRS, index, m,
		  sizeof(*m) + (uint64_t)got * sizeof(struct kvm_msr_entry));
out:
	free(m);
	free(one);
	return err;
}

static int save_cpuid(struct snapfmt_writer *w, int vcpu_fd, uint32_t index)
{
	struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + CPUID_MAX * sizeof(c->entries[0]));
	int err;

	if (!c)
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (cpuid)");
	c->nent = CPUID_MAX;
	if (kio(vcpu_fd, KVM_GET_CPUID2, c, "KVM_GET_CPUID2", (int)index) < 0) {
		free(c);
		return SNAPFMT_ERR_KVM;
	}
	c->padding = 0;
	err = add(w, SNAPFMT_SEC_X86_CPUID2, index, c,
		  sizeof(*c) + (uint64_t)c->nent * sizeof(c->entries[0]));
	free(c);
	return err;
}

int snapfmt_kvm_save_vcpu(struct snapfmt_writer *w, int vcpu_fd, uint32_t index,
			  const uint32_t *msrs, uint32_t n_msrs)
{
	int err;

	clear_errors();
	if (!w || (n_msrs && !msrs) || n_msrs > 1024)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_save_vcpu: bad argument");
	/* spec 6.2: MP_STATE first (reading it can complete a pending INIT/SIPI),
	   VCPU_EVENTS after LAPIC, then MSRS */
	SAVE_FIXED(KVM_GET_MP_STATE, SNAPFMT_SEC_X86_MP_STATE, struct kvm_mp_state,
		   "KVM_GET_MP_STATE");
	SAVE_FIXED(KVM_GET_REGS, SNAPFMT_SEC_X86_REGS, struct kvm_regs, "KVM_GET_REGS");
	SAVE_FIXED(KVM_GET_SREGS, SNAPFMT_SEC_X86_SREGS, struct kvm_sregs, "KVM_GET_SREGS");
	if ((err = save_xsave(w, vcpu_fd, index)))
		return err;
	SAVE_FIXED(KVM_GET_XCRS, SNAPFMT_SEC_X86_XCRS, struct kvm_xcrs, "KVM_GET_XCRS");
	SAVE_FIXED(KVM_GET_DEBUGREGS, SNAPFMT_SEC_X86_DEBUGREGS, struct kvm_debugregs,
		   "KVM_GET_DEBUGREGS");
	SAVE_FIXED(KVM_GET_LAPIC, SNAPFMT_SEC_X86_LAPIC, struct kvm_lapic_state, "KVM_GET_LAPIC");
	SAVE_FIXED(KVM_GET_VCPU_EVENTS, SNAPFMT_SEC_X86_VCPU_EVENTS, struct kvm_vcpu_events,
		   "KVM_GET_VCPU_EVENTS");
	if ((err = save_msrs(w, vcpu_fd, index, msrs, n_msrs)))
		return err;
	if ((err = save_cpuid(w, vcpu_fd, index)))
		return err;
	int khz = kio(vcpu_fd, KVM_GET_TSC_KHZ, NULL, "KVM_GET_TSC_KHZ", (int)index);
	if (khz < 0)
		return SNAPFMT_ERR_KVM;
	uint32_t tsc[2] = {(uint32_t)khz, 0};
	return add(w, SNAPFMT_SEC_X86_TSC_KHZ, index, tsc, sizeof(tsc));
}

/* The irqchips snapfmt_kvm_save_vm writes and snapfmt_kvm_restore_vm reads
   back, in this order: KVM chip id, section type + instance, and the ioctl
   names for error messages (static strings: kio keeps the pointer). */
static const struct {
	uint32_t id, type, inst;
	const char *get_name, *set_name;
} irqchips[] = {
	{KVM_IRQCHIP_PIC_MASTER, SNAPFMT_SEC_X86_PIC, 0, "KVM_GET_IRQCHIP(PIC master)",
	 "KVM_SET_IRQCHIP(PIC master)"},
	{KVM_IRQCHIP_PIC_SLAVE, SNAPFMT_SEC_X86_PIC, 1, "KVM_GET_IRQCHIP(PIC slave)",
	 "KVM_SET_IRQCHIP(PIC slave)"},
	{KVM_IRQCHIP_IOAPIC, SNAPFMT_SEC_X86_IOAPIC, 0, "KVM_GET_IRQCHIP(IOAPIC)",
	 "KVM_SET_IRQCHIP(IOAPIC)"},
};

int snapfmt_kvm_save_vm(struct snapfmt_writer *w, int vm_fd)
{
	struct kvm_pit_state2 pit;
	struct kvm_clock_data clock;
	struct kvm_irqchip chip;
	int err;

	clear_errors();
	if (!w)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_save_vm: NULL writer");
	memset(&pit, 0, sizeof(pit));
	if (kio(vm_fd, KVM_GET_PIT2, &pit, "KVM_GET_PIT2", -1) < 0)
		return SNAPFMT_ERR_KVM;
	if ((err = add(w, SNAPFMT_SEC_X86_PIT2, 0, &pit, sizeof(pit))))
		return err;
	memset(&clock, 0, sizeof(clock));
	if (kio(vm_fd, KVM_GET_CLOCK, &clock, "KVM_GET_CLOCK", -1) < 0)
		return SNAPFMT_ERR_KVM;
	if ((err = add(w, SNAPFMT_SEC_X86_CLOCK, 0, &clock, sizeof(clock))))
		return err;
	for (size_t i = 0; i < sizeof(irqchips) / sizeof(irqchips[0]); i++) {
		memset(&chip, 0, sizeof(chip));
		chip.chip_id = irqchips[i].id;
		if (kio(vm_fd, KVM_GET_IRQCHIP, &chip, irqchips[i].get_name, -1) < 0)
			return SNAPFMT_ERR_KVM;
		if ((err = add(w, irqchips[i].type, irqchips[i].inst, &chip, sizeof(chip))))
			return err;
	}
	return 0;
}

/* ------------------------------------------------------------ RAM save */
static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v);
	put32(p + 4, (uint32_t)(v >> 32));
}

/* memory_layout bytes for n backing-0 regions (instance i = region i). */
static uint8_t *layout_bytes(const struct snapfmt_kvm_ram *regions, uint32_t n, uint64_t *len)
{
	uint8_t *b;

	*len = MEMLAYOUT_HDR + (uint64_t)n * MEMREG_SIZE;
	b = calloc(1, *len);
	if (!b)
		return NULL;
	put32(b, n);
	put32(b + 4, 0); /* strings_len */
	for (uint32_t i = 0; i < n; i++) {
		uint8_t *r = b + MEMLAYOUT_HDR + (uint64_t)i * MEMREG_SIZE;

		put64(r + MR_GPA, regions[i].gpa);
		put64(r + MR_SIZE, regions[i].size);
		put32(r + MR_BACKING, MEM_BACKING_SECTION);
		put32(r + MR_FLAGS, 0);
		put32(r + MR_INSTANCE, i);
	}
	return b;
}

int snapfmt_kvm_save_ram(struct snapfmt_writer *w, int fd, const uint64_t *fd_offsets,
			 const struct snapfmt_kvm_ram *regions, uint32_t n)
{
	uint64_t len;
	uint8_t *lay;
	int err;

	clear_errors();
	if (!w || !fd_offsets || !regions || n == 0 || n > 1024)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_save_ram: bad argument");
	for (uint32_t i = 0; i < n; i++) {
		if (regions[i].size == 0 || regions[i].size % 4096 || regions[i].gpa % 4096)
			return err_msg(SNAPFMT_ERR_BADALIGN,
				       "RAM region %u [0x%llx, +0x%llx) not page-aligned", i,
				       (unsigned long long)regions[i].gpa,
				       (unsigned long long)regions[i].size);
		for (uint32_t j = 0; j < i; j++)
			if (regions[i].gpa < regions[j].gpa + regions[j].size &&
			    regions[j].gpa < regions[i].gpa + regions[i].size)
				return err_msg(SNAPFMT_ERR_OVERLAP, "RAM regions %u and %u overlap",
					       j, i);
	}
	lay = layout_bytes(regions, n, &len);
	if (!lay)
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (memory layout)");
	/* memory layout first, then the RAM (spec 5.1) */
	err = add(w, SNAPFMT_SEC_MEMORY_LAYOUT, 0, lay, len);
	free(lay);
	if (err)
		return err;
	for (uint32_t i = 0; i < n; i++) {
		err = snapfmt_writer_add_ram(w, i, NULL, fd, fd_offsets[i], regions[i].size);
		if (err)
			return err_msg(err, "writing RAM region %u (%llu bytes): %s%s%s", i,
				       (unsigned long long)regions[i].size, snapfmt_strerror(err),
				       err == SNAPFMT_ERR_IO ? ": " : "",
				       err == SNAPFMT_ERR_IO ? strerror(errno) : "");
	}
	return 0;
}

/* ------------------------------------------------------------ metadata */
static int put_str16(uint8_t *b, size_t cap, size_t *pos, const char *s)
{
	size_t n = strlen(s);

	if (n > 0xffff || *pos + 2 + n > cap)
		return -1;
	b[(*pos)++] = (uint8_t)n;
	b[(*pos)++] = (uint8_t)(n >> 8);
	memcpy(b + *pos, s, n);
	*pos += n;
	return 0;
}

static void cpu_strings(char *vendor, size_t vlen, char *model, size_t mlen)
{
	unsigned a, b, c, d;
	char v[13] = "", brand[49] = "";

	if (__get_cpuid(0, &a, &b, &c, &d)) {
		memcpy(v, &b, 4);
		memcpy(v + 4, &d, 4);
		memcpy(v + 8, &c, 4);
		v[12] = 0;
	}
	if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
		for (unsigned i = 0; i < 3; i++) {
			__get_cpuid(0x80000002 + i, &a, &b, &c, &d);
			memcpy(brand + 16 * i, &a, 4);
			memcpy(brand + 16 * i + 4, &b, 4);
			memcpy(brand + 16 * i + 8, &c, 4);
			memcpy(brand + 16 * i + 12, &d, 4);
		}
		brand[48] = 0;
	}
	const char *m = brand;
	while (*m == ' ')
		m++;
	snprintf(vendor, vlen, "%s", v);
	snprintf(model, mlen, "%s", m);
}

int snapfmt_kvm_save_metadata(struct snapfmt_writer *w, const char *producer,
			      const char *producer_version, const char *const *kv, uint32_t nkv,
			      uint64_t *created_ns)
{
	struct timespec ts;
	struct utsname u;
	char vendor[16], model[64];
	size_t cap = 4096, pos = 0;
	uint8_t *b;
	int err;

	clear_errors();
	if (!w || !producer || !producer_version || (nkv && !kv) || nkv > 4096)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_save_metadata: bad argument");
	for (uint32_t i = 0; i < 2 * nkv; i++)
		cap += strlen(kv[i]) + 6;
	b = calloc(1, cap);
	if (!b)
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (metadata)");
	clock_gettime(CLOCK_REALTIME, &ts);
	uint64_t now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
	if (uname(&u) < 0)
		snprintf(u.release, sizeof(u.release), "unknown");
	cpu_strings(vendor, sizeof(vendor), model, sizeof(model));
	put64(b, now);
	pos = 8;
	if (put_str16(b, cap, &pos, producer) || put_str16(b, cap, &pos, producer_version) ||
	    put_str16(b, cap, &pos, u.release) || put_str16(b, cap, &pos, vendor) ||
	    put_str16(b, cap, &pos, model)) {
		free(b);
		return err_msg(SNAPFMT_ERR_LIMIT, "metadata string too long");
	}
	put32(b + pos, nkv);
	pos += 4;
	for (uint32_t i = 0; i < nkv; i++) {
		size_t vl = strlen(kv[2 * i + 1]);

		if (put_str16(b, cap, &pos, kv[2 * i]) || vl > 0xffffffffu || pos + 4 + vl > cap) {
			free(b);
			return err_msg(SNAPFMT_ERR_LIMIT, "metadata entry %u too long", i);
		}
		put32(b + pos, (uint32_t)vl);
		memcpy(b + pos + 4, kv[2 * i + 1], vl);
		pos += 4 + vl;
	}
	err = snapfmt_writer_add(w, SNAPFMT_SEC_METADATA, 0, 0, 1, b, pos);
	free(b);
	if (err)
		return err_msg(err, "writing metadata: %s", snapfmt_strerror(err));
	if (created_ns)
		*created_ns = now;
	return 0;
}

/* created_unix_ns of the metadata section; 0 if absent or too short. */
static uint64_t sealed_mtime(const struct snapfmt_reader *r)
{
	struct snapfmt_section s;

	if (snapfmt_find(r, SNAPFMT_SEC_METADATA, 0, &s) || s.length < 8)
		return 0;
	return snapfmt_get_le64(s.data);
}

/* ------------------------------------------------------------ immutability */
int snapfmt_kvm_check_immutable(int fd)
{
	struct stat st;
	int seals;

	clear_errors();
	if (fstat(fd, &st) < 0)
		return err_msg(SNAPFMT_ERR_IO, "fstat RAM file: %s", strerror(errno));
	if (!S_ISREG(st.st_mode))
		return err_msg(SNAPFMT_ERR_CHANGED, "RAM file is not a regular file");
	seals = fcntl(fd, F_GET_SEALS);
	if (seals >= 0 && !(seals & F_SEAL_SEAL)) {
		/* a memfd that can still be sealed: it must be sealed */
		int need = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;

		if ((seals & need) != need)
			return err_msg(SNAPFMT_ERR_CHANGED,
				       "RAM memfd lacks F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW "
				       "(seals 0x%x)", (unsigned)seals);
		return 0;
	}
	if (seals >= 0 && (seals & (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW)) ==
			      (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW))
		return 0;
	if (st.st_mode & 0222)
		return err_msg(SNAPFMT_ERR_CHANGED, "RAM file is writable (mode 0%03o)",
			       (unsigned)(st.st_mode & 07777));
	return 0;
}

int snapfmt_kvm_seal(const char *path)
{
	struct snapfmt_reader *r = NULL;
	char self[64];
	int fd, err;

	clear_errors();
	if (!path)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_seal: NULL path");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return err_msg(SNAPFMT_ERR_IO, "open %s: %s", path, strerror(errno));
	snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
	err = snapfmt_open(self, 0, &r);
	if (err) {
		close(fd);
		return err_msg(err, "%s: %s", path, snapfmt_strerror(err));
	}
	uint64_t t = sealed_mtime(r);
	snapfmt_close(r);
	if (fchmod(fd, 0444) < 0) {
		err = err_msg(SNAPFMT_ERR_IO, "chmod 0444 %s: %s", path, strerror(errno));
	} else if (t) {
		struct timespec tv[2] = {{.tv_nsec = UTIME_OMIT},
					 {.tv_sec = (time_t)(t / 1000000000ull),
					  .tv_nsec = (long)(t % 1000000000ull)}};

		if (futimens(fd, tv) < 0)
			err = err_msg(SNAPFMT_ERR_IO, "set mtime of %s: %s", path, strerror(errno));
	}
	close(fd);
	return err;
}

/* Readers opened by snapfmt_kvm_open and the identity of their file at open
 * (the file itself is the reader's fd, snapfmt_reader_fd()). */
struct opened {
	const struct snapfmt_reader *r;
	struct stat st;
	struct opened *next;
};
static pthread_mutex_t opened_lock = PTHREAD_MUTEX_INITIALIZER;
static struct opened *opened_list;

static int64_t ts_ns(struct timespec t)
{
	return (int64_t)t.tv_sec * 1000000000ll + t.tv_nsec;
}

/* The whole restore-time check of an opened snapshot file. */
static int check_file(int fd, const struct snapfmt_reader *r, const struct stat *at_open)
{
	struct snapfmt_info info;
	struct stat st;
	int err;

	if ((err = snapfmt_kvm_check_immutable(fd)))
		return err;
	if (fstat(fd, &st) < 0)
		return err_msg(SNAPFMT_ERR_IO, "fstat snapshot: %s", strerror(errno));
	snapfmt_get_info(r, &info);
	if ((uint64_t)st.st_size != info.file_size)
		return err_msg(SNAPFMT_ERR_CHANGED, "snapshot size %lld != file_size %llu",
			       (long long)st.st_size, (unsigned long long)info.file_size);
	uint64_t t = sealed_mtime(r);
	if (t && (uint64_t)ts_ns(st.st_mtim) != t)
		return err_msg(SNAPFMT_ERR_CHANGED,
			       "snapshot modified after it was sealed (mtime %lld ns != sealed %llu ns; "
			       "re-seal a verified copy with snapfmt_kvm_seal)",
			       (long long)ts_ns(st.st_mtim), (unsigned long long)t);
	if (at_open && (st.st_dev != at_open->st_dev || st.st_ino != at_open->st_ino ||
			st.st_size != at_open->st_size ||
			ts_ns(st.st_mtim) != ts_ns(at_open->st_mtim) ||
			ts_ns(st.st_ctim) != ts_ns(at_open->st_ctim)))
		return err_msg(SNAPFMT_ERR_CHANGED,
			       "snapshot file changed since it was opened (dev, ino, size, mtime or "
			       "ctime differ)");
	return 0;
}

int snapfmt_kvm_open(const char *path, unsigned flags, struct snapfmt_reader **out,
		     struct snapfmt_diag *diag)
{
	struct opened *o;
	char self[64];
	int fd, err;

	clear_errors();
	if (!path || !out)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_open: NULL argument");
	*out = NULL;
	o = calloc(1, sizeof(*o));
	if (!o)
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		free(o);
		return err_msg(SNAPFMT_ERR_IO, "cannot open %s: %s", path, strerror(errno));
	}
	if (fstat(fd, &o->st) < 0) {
		err = err_msg(SNAPFMT_ERR_IO, "fstat %s: %s", path, strerror(errno));
		goto fail;
	}
	/* the reader opens the same inode, whatever happens to the path */
	snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
	err = snapfmt_open_diag(self, flags, out, diag);
	if (err) {
		if (diag && diag->message[0])
			err_msg(0, "%s: %s", path, diag->message);
		else
			err_msg(0, "%s: %s", path, snapfmt_strerror(err));
		goto fail;
	}
	/* the reader holds its own fd of the same inode: ours is not needed */
	close(fd);
	fd = -1;
	if ((err = check_file(snapfmt_reader_fd(*out), *out, &o->st))) {
		char m[sizeof(t_last_error)];

		snprintf(m, sizeof(m), "%s", t_last_error);
		err_msg(0, "%s: %s", path, m);
		snapfmt_close(*out);
		*out = NULL;
		goto fail;
	}
	o->r = *out;
	pthread_mutex_lock(&opened_lock);
	o->next = opened_list;
	opened_list = o;
	pthread_mutex_unlock(&opened_lock);
	return 0;
fail:
	if (fd >= 0)
		close(fd);
	free(o);
	return err;
}

void snapfmt_kvm_close(struct snapfmt_reader *r)
{
	struct opened **pp, *o = NULL;

	if (!r)
		return;
	pthread_mutex_lock(&opened_lock);
	for (pp = &opened_list; *pp; pp = &(*pp)->next)
		if ((*pp)->r == r) {
			o = *pp;
			*pp = o->next;
			break;
		}
	pthread_mutex_unlock(&opened_lock);
	free(o);
	snapfmt_close(r);
}

/* Re-check the identity of an opened reader's file (0, CHANGED, or INVAL
   when r was not opened by snapfmt_kvm_open). */
static int recheck(const struct snapfmt_reader *r)
{
	int err = SNAPFMT_ERR_CHANGED, found = 0;

	pthread_mutex_lock(&opened_lock);
	for (struct opened *o = opened_list; o; o = o->next)
		if (o->r == r) {
			found = 1;
			err = check_file(snapfmt_reader_fd(r), r, &o->st);
			break;
		}
	pthread_mutex_unlock(&opened_lock);
	if (!found)
		return err_msg(SNAPFMT_ERR_CHANGED,
			       "reader not opened with snapfmt_kvm_open: the RAM file's immutability "
			       "cannot be checked");
	return err;
}

/* ------------------------------------------------------------ RAM restore */
static void unmap_all(struct snapfmt_kvm_ram *out, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (out[i].host)
			munmap(out[i].host, out[i].size);
}

int snapfmt_kvm_restore_ram(const struct snapfmt_reader *r, int vm_fd, uint32_t first_slot,
			    struct snapfmt_kvm_ram *out, uint32_t cap, uint32_t *n)
{
	struct snapfmt_section lay;
	uint32_t nreg, done = 0;
	int err;

	clear_errors();
	if (!r || !out || !n)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_restore_ram: NULL argument");
	*n = 0;
	if ((err = recheck(r)))
		return err;
	err = snapfmt_find(r, SNAPFMT_SEC_MEMORY_LAYOUT, 0, &lay);
	if (err)
		return err_msg(err, "memory_layout: %s", snapfmt_strerror(err));
	if (lay.length < MEMLAYOUT_HDR)
		return err_msg(SNAPFMT_ERR_BADLENGTH, "memory_layout shorter than its header");
	nreg = snapfmt_get_le32(lay.data);
	if (nreg > 1024 || MEMLAYOUT_HDR + (uint64_t)nreg * MEMREG_SIZE > lay.length)
		return err_msg(SNAPFMT_ERR_BADLENGTH, "memory_layout: %u regions in %llu bytes", nreg,
			       (unsigned long long)lay.length);
	if (nreg > cap)
		return err_msg(SNAPFMT_ERR_LIMIT, "memory_layout has %u regions, room for %u", nreg,
			       cap);
	memset(out, 0, nreg * sizeof(*out));
	for (uint32_t i = 0; i < nreg; i++) {
		const uint8_t *rec = (const uint8_t *)lay.data + MEMLAYOUT_HDR + (uint64_t)i * MEMREG_SIZE;
		uint64_t gpa = snapfmt_get_le64(rec + MR_GPA), size = snapfmt_get_le64(rec + MR_SIZE);
		uint32_t backing = snapfmt_get_le32(rec + MR_BACKING);
		uint32_t flags = snapfmt_get_le32(rec + MR_FLAGS);
		uint32_t inst = snapfmt_get_le32(rec + MR_INSTANCE);
		uint64_t len = 0;
		void *p = NULL;

		if (size == 0 || size % 4096 || gpa % 4096 || (uint64_t)(size_t)size != size) {
			err = err_msg(SNAPFMT_ERR_BADALIGN, "memory region %u: [0x%llx, +0x%llx)", i,
				      (unsigned long long)gpa, (unsigned long long)size);
			goto fail;
		}
		if (backing == MEM_BACKING_SECTION) {
			err = snapfmt_map_ram(r, inst, NULL, PROT_READ | PROT_WRITE, &p, &len);
			if (err) {
				err_msg(err, "memory region %u: map ram[%u]: %s%s%s", i, inst,
					snapfmt_strerror(err), err == SNAPFMT_ERR_IO ? ": " : "",
					err == SNAPFMT_ERR_IO ? strerror(errno) : "");
				goto fail;
			}
			if (len != size) {
				munmap(p, (size_t)len);
				err = err_msg(SNAPFMT_ERR_BADLENGTH,
					      "memory region %u: size %llu != ram[%u] length %llu", i,
					      (unsigned long long)size, inst, (unsigned long long)len);
				goto fail;
			}
		} else if (backing == MEM_BACKING_ZERO) {
			p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
			if (p == MAP_FAILED) {
				err = err_msg(SNAPFMT_ERR_IO, "memory region %u: mmap zero: %s", i,
					      strerror(errno));
				goto fail;
			}
		} else {
			err = err_msg(SNAPFMT_ERR_INVAL,
				      "memory region %u: backing %u (sibling file) not supported by "
				      "this restore path", i, backing);
			goto fail;
		}
		out[i].gpa = gpa;
		out[i].size = size;
		out[i].host = p;
		out[i].slot = first_slot + i;
		done = i + 1;
		struct kvm_userspace_memory_region mr = {
			.slot = first_slot + i,
			.flags = (flags & MEM_F_READONLY) ? KVM_MEM_READONLY : 0,
			.guest_phys_addr = gpa,
			.memory_size = size,
			.userspace_addr = (uint64_t)(uintptr_t)p,
		};
		if (kio(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr, "KVM_SET_USER_MEMORY_REGION", -1) < 0) {
			err = SNAPFMT_ERR_KVM;
			goto fail;
		}
	}
	*n = nreg;
	return 0;
fail:
	unmap_all(out, done);
	memset(out, 0, done * sizeof(*out));
	return err;
}

/* ------------------------------------------------------------ restore */
static int need(const struct snapfmt_reader *r, uint32_t type, uint32_t inst, uint64_t min_len,
		struct snapfmt_section *s)
{
	int err = snapfmt_find(r, type, inst, s);

	if (err)
		return err_msg(err, "%s[%u]: %s", sec_name(type), inst, snapfmt_strerror(err));
	if (s->length < min_len)
		return err_msg(SNAPFMT_ERR_BADLENGTH, "%s[%u]: length %llu < %llu", sec_name(type),
			       inst, (unsigned long long)s->length, (unsigned long long)min_len);
	return 0;
}

#define SET_FIXED(type, T, ioc, name)                                              \
	do {                                                                       \
		T v_;                                                              \
		if ((err = need(r, type, index, sizeof(T), &s)))                   \
			return err;                                                \
		memcpy(&v_, s.data, sizeof(v_));                                   \
		if (kio(vcpu_fd, ioc, &v_, name, (int)index) < 0)                  \
			return SNAPFMT_ERR_KVM;                                    \
	} while (0)

static int set_msrs(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index)
{
	struct snapfmt_section s;
	struct kvm_msrs *m;
	uint32_t n, k = 0;
	int err;

	if ((err = need(r, SNAPFMT_SEC_X86_MSRS, index, 8, &s)))
		return err;
	n = snapfmt_get_le32(s.data);
	if (8 + (uint64_t)n * 16 != s.length)
		return err_msg(SNAPFMT_ERR_BADLENGTH, "x86.msrs[%u]: %u entries in %llu bytes", index,
			       n, (unsigned long long)s.length);
	const struct kvm_msr_entry *src = (const void *)((const uint8_t *)s.data + 8);
	struct kvm_msr_entry *ord = malloc((n + 1) * sizeof(*ord));
	m = calloc(1, sizeof(*m) + MSR_SET_CHUNK * sizeof(m->entries[0]));
	if (!ord || !m) {
		free(ord);
		free(m);
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (MSRs)");
	}
	/* IA32_TSC first: TSC_DEADLINE is relative to it */
	for (uint32_t i = 0; i < n; i++)
		if (src[i].index == MSR_IA32_TSC)
			ord[k++] = src[i];
	for (uint32_t i = 0; i < n; i++)
		if (src[i].index != MSR_IA32_TSC)
			ord[k++] = src[i];
	for (uint32_t off = 0; off < k && !err; off += MSR_SET_CHUNK) {
		uint32_t c = k - off < MSR_SET_CHUNK ? k - off : MSR_SET_CHUNK;

		m->nmsrs = c;
		memcpy(m->entries, ord + off, c * sizeof(*ord));
		int w = kio(vcpu_fd, KVM_SET_MSRS, m, "KVM_SET_MSRS", (int)index);
		if (w < 0)
			err = SNAPFMT_ERR_KVM;
		else if ((uint32_t)w != c) {
			t_last_ioctl = "KVM_SET_MSRS";
			errno = EINVAL;
			err = err_msg(SNAPFMT_ERR_KVM,
				      "vCPU %u: KVM_SET_MSRS wrote %d of %u entries, rejected MSR 0x%x",
				      index, w, c, ord[off + (uint32_t)w].index);
		}
	}
	free(ord);
	free(m);
	return err;
}

static int set_cpuid(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index)
{
	struct snapfmt_section s;
	int err;

	if ((err = need(r, SNAPFMT_SEC_X86_CPUID2, index, 8, &s)))
		return err;
	uint32_t n = snapfmt_get_le32(s.data);
	if (n > CPUID_MAX || 8 + (uint64_t)n * 40 != s.length)
		return err_msg(SNAPFMT_ERR_BADLENGTH, "x86.cpuid2[%u]: %u entries in %llu bytes",
			       index, n, (unsigned long long)s.length);
	/* kvm_cpuid2 is read-only for KVM_SET_CPUID2: pass the mapping itself */
	if (kio(vcpu_fd, KVM_SET_CPUID2, (void *)(uintptr_t)s.data, "KVM_SET_CPUID2", (int)index) < 0)
		return SNAPFMT_ERR_KVM;
	return 0;
}

static int set_xsave(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index)
{
	struct snapfmt_section s;
	uint32_t size = xsave_size();
	void *buf;
	int err;

	if ((err = need(r, SNAPFMT_SEC_X86_XSAVE, index, sizeof(struct kvm_xsave), &s)))
		return err;
	if (s.length > size)
		return err_msg(SNAPFMT_ERR_BADVALUE,
			       "x86.xsave[%u]: %llu bytes, KVM here takes %u (KVM_CAP_XSAVE2)",
			       index, (unsigned long long)s.length, size);
	if (s.length == size)
		return kio(vcpu_fd, KVM_SET_XSAVE, (void *)(uintptr_t)s.data, "KVM_SET_XSAVE",
			   (int)index) < 0 ? SNAPFMT_ERR_KVM : 0;
	/* KVM reads its own (larger) size: pad with zeros (XSTATE_BV says the
	   extra components are in their init state) */
	if (posix_memalign(&buf, 64, size))
		return err_msg(SNAPFMT_ERR_NOMEM, "out of memory (xsave)");
	memset(buf, 0, size);
	memcpy(buf, s.data, (size_t)s.length);
	err = kio(vcpu_fd, KVM_SET_XSAVE, buf, "KVM_SET_XSAVE", (int)index) < 0 ? SNAPFMT_ERR_KVM : 0;
	free(buf);
	return err;
}

static void check_tsc(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index)
{
	struct snapfmt_section s;

	if (snapfmt_find(r, SNAPFMT_SEC_X86_TSC_KHZ, index, &s) || s.length < 4)
		return;
	uint32_t want = snapfmt_get_le32(s.data);
	int have = ioctl(vcpu_fd, KVM_GET_TSC_KHZ, 0);
	if (have < 0 || (uint32_t)have == want || !want)
		return;
	pthread_once(&sys_once, sys_probe);
	if (sys_tsc_control && ioctl(vcpu_fd, KVM_SET_TSC_KHZ, (unsigned long)want) == 0) {
		snprintf(t_last_note, sizeof(t_last_note),
			 "vCPU %u: TSC scaled from %d kHz to the snapshot's %u kHz", index, have,
			 want);
		return;
	}
	snprintf(t_last_note, sizeof(t_last_note),
		 "vCPU %u: TSC %u kHz in the snapshot, %d kHz here and KVM_CAP_TSC_CONTROL "
		 "unavailable: guest TSC runs at the host rate", index, want, have);
}

int snapfmt_kvm_restore_vcpu(const struct snapfmt_reader *r, int vcpu_fd, uint32_t index)
{
	struct snapfmt_section s;
	int err;

	clear_errors();
	t_last_note[0] = '\0';
	if (!r)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_restore_vcpu: NULL reader");
	if ((err = set_cpuid(r, vcpu_fd, index)))
		return err;
	check_tsc(r, vcpu_fd, index);
	SET_FIXED(SNAPFMT_SEC_X86_MP_STATE, struct kvm_mp_state, KVM_SET_MP_STATE,
		  "KVM_SET_MP_STATE");
	SET_FIXED(SNAPFMT_SEC_X86_REGS, struct kvm_regs, KVM_SET_REGS, "KVM_SET_REGS");
	SET_FIXED(SNAPFMT_SEC_X86_SREGS, struct kvm_sregs, KVM_SET_SREGS, "KVM_SET_SREGS");
	if ((err = set_xsave(r, vcpu_fd, index)))
		return err;
	SET_FIXED(SNAPFMT_SEC_X86_XCRS, struct kvm_xcrs, KVM_SET_XCRS, "KVM_SET_XCRS");
	SET_FIXED(SNAPFMT_SEC_X86_DEBUGREGS, struct kvm_debugregs, KVM_SET_DEBUGREGS,
		  "KVM_SET_DEBUGREGS");
	SET_FIXED(SNAPFMT_SEC_X86_LAPIC, struct kvm_lapic_state, KVM_SET_LAPIC, "KVM_SET_LAPIC");
	if ((err = set_msrs(r, vcpu_fd, index)))
		return err;
	SET_FIXED(SNAPFMT_SEC_X86_VCPU_EVENTS, struct kvm_vcpu_events, KVM_SET_VCPU_EVENTS,
		  "KVM_SET_VCPU_EVENTS");
	return 0;
}

int snapfmt_kvm_restore_vm(const struct snapfmt_reader *r, int vm_fd)
{
	struct snapfmt_section s;
	struct kvm_pit_state2 pit;
	struct kvm_clock_data clock;
	struct kvm_irqchip chip;
	int err;

	clear_errors();
	if (!r)
		return err_msg(SNAPFMT_ERR_INVAL, "snapfmt_kvm_restore_vm: NULL reader");
	if ((err = need(r, SNAPFMT_SEC_X86_PIT2, 0, sizeof(pit), &s)))
		return err;
	memcpy(&pit, s.data, sizeof(pit));
	if (kio(vm_fd, KVM_SET_PIT2, &pit, "KVM_SET_PIT2", -1) < 0)
		return SNAPFMT_ERR_KVM;
	if ((err = need(r, SNAPFMT_SEC_X86_CLOCK, 0, sizeof(clock), &s)))
		return err;
	memcpy(&clock, s.data, sizeof(clock));
	clock.flags = 0; /* GET reports KVM_CLOCK_TSC_STABLE etc.; SET rejects unknown flags */
	if (kio(vm_fd, KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK", -1) < 0)
		return SNAPFMT_ERR_KVM;
	for (size_t i = 0; i < sizeof(irqchips) / sizeof(irqchips[0]); i++) {
		if ((err = need(r, irqchips[i].type, irqchips[i].inst, sizeof(chip), &s)))
			return err;
		memcpy(&chip, s.data, sizeof(chip));
		if (chip.chip_id != irqchips[i].id)
			return err_msg(SNAPFMT_ERR_BADVALUE, "%s[%u]: chip_id %u, want %u",
				       sec_name(irqchips[i].type), irqchips[i].inst, chip.chip_id,
				       irqchips[i].id);
		if (kio(vm_fd, KVM_SET_IRQCHIP, &chip, irqchips[i].set_name, -1) < 0)
			return SNAPFMT_ERR_KVM;
	}
	return 0;
}
