/* snapvm VM plumbing: RAM, VM/vCPU creation, long mode boot, run loop. */
#define _GNU_SOURCE
#include "vm.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int fail(const char *fmt, ...)
{
	va_list ap;
	int saved = errno;

	fprintf(stderr, "snapvm[%d]: ", (int)getpid());
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	errno = saved;
	return -1;
}

int xioctl(int fd, unsigned long req, void *arg)
{
	for (int i = 0; i < 1000; i++) {
		int r = ioctl(fd, req, arg);
		if (r >= 0 || (errno != EINTR && errno != EAGAIN))
			return r;
	}
	return -1;
}

uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------ guest RAM */
int ram_create_memfd(struct guest_ram *ram, size_t size)
{
	memset(ram, 0, sizeof(*ram));
	ram->fd = memfd_create("snapvm-ram", MFD_CLOEXEC);
	if (ram->fd < 0)
		return fail("memfd_create: %s", strerror(errno));
	if (ftruncate(ram->fd, (off_t)size) < 0) {
		fail("ftruncate memfd to %zu: %s", size, strerror(errno));
		goto err;
	}
	ram->host = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED,
			 ram->fd, 0);
	if (ram->host == MAP_FAILED) {
		ram->host = NULL;
		fail("mmap RAM (%zu bytes): %s", size, strerror(errno));
		goto err;
	}
	ram->size = size;
	return 0;
err:
	close(ram->fd);
	ram->fd = -1;
	return -1;
}

int ram_map_private(struct guest_ram *ram, int fd, off_t off, size_t size)
{
	memset(ram, 0, sizeof(*ram));
	ram->fd = -1;
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, off);
	if (p == MAP_FAILED)
		return fail("mmap RAM MAP_PRIVATE (%zu bytes at %lld): %s",
			    size, (long long)off, strerror(errno));
	ram->host = p;
	ram->size = size;
	ram->is_private = 1;
	return 0;
}

void ram_drop_fd(struct guest_ram *ram)
{
	if (ram->fd >= 0) {
		close(ram->fd);
		ram->fd = -1;
	}
}

void ram_release(struct guest_ram *ram)
{
	if (ram->host)
		munmap(ram->host, ram->size);
	ram->host = NULL;
	ram_drop_fd(ram);
}

/* ------------------------------------------------------------ VM */
static int get_supported_cpuid(int kvm_fd, struct kvm_cpuid2 **out)
{
	for (uint32_t n = 64; n <= 1024; n *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + n * sizeof(c->entries[0]));
		if (!c)
			return fail("out of memory");
		c->nent = n;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
			*out = c;
			return 0;
		}
		int e = errno;
		free(c);
		if (e != E2BIG)
			return fail("KVM_GET_SUPPORTED_CPUID: %s", strerror(e));
	}
	return fail("KVM_GET_SUPPORTED_CPUID: too many entries");
}

static int msr_list(int fd, unsigned long req, uint32_t **out, uint32_t *n)
{
	struct kvm_msr_list probe = {.nmsrs = 0};
	if (ioctl(fd, req, &probe) < 0 && errno != E2BIG)
		return -1;
	struct kvm_msr_list *l = calloc(1, sizeof(*l) + probe.nmsrs * sizeof(uint32_t));
	if (!l)
		return fail("out of memory");
	l->nmsrs = probe.nmsrs;
	if (ioctl(fd, req, l) < 0) {
		free(l);
		return -1;
	}
	uint32_t *v = malloc((l->nmsrs + 1) * sizeof(uint32_t));
	if (!v) {
		free(l);
		return fail("out of memory");
	}
	memcpy(v, l->indices, l->nmsrs * sizeof(uint32_t));
	*n = l->nmsrs;
	*out = v;
	free(l);
	return 0;
}

/* Build vm->msr_idx: MSRs from KVM_GET_MSR_INDEX_LIST that are not feature
   MSRs (those describe the host, e.g. 0x10a ARCH_CAPABILITIES, and must not
   be restored) and that KVM_GET_MSRS actually returns on this vCPU. */
static int probe_msrs(struct vm *vm)
{
	uint32_t *idx = NULL, *feat = NULL, nidx = 0, nfeat = 0;

	if (msr_list(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &idx, &nidx) < 0)
		return fail("KVM_GET_MSR_INDEX_LIST: %s", strerror(errno));
	if (msr_list(vm->kvm_fd, KVM_GET_MSR_FEATURE_INDEX_LIST, &feat, &nfeat) < 0)
		nfeat = 0; /* optional */

	/* one-entry struct kvm_msrs (flexible array) in an aligned buffer */
	uint64_t onebuf[(sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry) + 7) / 8];
	struct kvm_msrs *one = (struct kvm_msrs *)onebuf;
	vm->nmsr_idx = 0;
	for (uint32_t i = 0; i < nidx && vm->nmsr_idx < SNAP_MAX_MSRS; i++) {
		int is_feat = idx[i] == 0x10a;
		for (uint32_t j = 0; j < nfeat && !is_feat; j++)
			is_feat = feat[j] == idx[i];
		if (is_feat)
			continue;
		memset(onebuf, 0, sizeof(onebuf));
		one->nmsrs = 1;
		one->entries[0].index = idx[i];
		if (ioctl(vm->vcpu_fd, KVM_GET_MSRS, one) != 1)
			continue;
		vm->msr_idx[vm->nmsr_idx++] = idx[i];
	}
	if (vm->verbose)
		fprintf(stderr, "snapvm: %u MSRs in index list, %u feature, %u saved\n",
			nidx, nfeat, vm->nmsr_idx);
	free(idx);
	free(feat);
	return 0;
}

int vm_create(struct vm *vm)
{
	struct kvm_cpuid2 *cpuid = NULL;

	vm->vm_fd = vm->vcpu_fd = -1;
	vm->run = NULL;
	if (vm->kvm_fd < 0) {
		vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		if (vm->kvm_fd < 0)
			return fail("open /dev/kvm: %s", strerror(errno));
	}
	int ver = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
	if (ver != KVM_API_VERSION)
		return fail("KVM_GET_API_VERSION: got %d, want %d", ver, KVM_API_VERSION);
	vm->vm_fd = xioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0)
		return fail("KVM_CREATE_VM: %s", strerror(errno));
	if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
		return fail("KVM_SET_TSS_ADDR: %s", strerror(errno));
	uint64_t idmap = 0xfffbc000;
	if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0)
		return fail("KVM_SET_IDENTITY_MAP_ADDR: %s", strerror(errno));
	if (vm->pre_irqchip && vm->pre_irqchip(vm, vm->pre_irqchip_arg) < 0)
		return -1;
	if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		return fail("KVM_CREATE_IRQCHIP: %s", strerror(errno));
	struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
	if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		return fail("KVM_CREATE_PIT2: %s", strerror(errno));

	int xs = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	vm->xsave_size = xs >= 4096 ? (uint32_t)xs : 4096;
	if (vm->xsave_size > SNAP_XSAVE_MAX)
		return fail("KVM_CAP_XSAVE2 = %u exceeds %u", vm->xsave_size, SNAP_XSAVE_MAX);

	vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
	if (vm->vcpu_fd < 0)
		return fail("KVM_CREATE_VCPU: %s", strerror(errno));
	if (fcntl(vm->vcpu_fd, F_SETFD, FD_CLOEXEC) < 0 ||
	    fcntl(vm->vm_fd, F_SETFD, FD_CLOEXEC) < 0)
		return fail("fcntl FD_CLOEXEC: %s", strerror(errno));
	int sz = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (sz < (int)sizeof(struct kvm_run))
		return fail("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
	vm->run_size = (size_t)sz;
	vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		       vm->vcpu_fd, 0);
	if (vm->run == MAP_FAILED) {
		vm->run = NULL;
		return fail("mmap kvm_run: %s", strerror(errno));
	}
	uart_init(&vm->uart, vm->vm_fd, -1);
	if (vm->for_restore)
		return 0;
	if (get_supported_cpuid(vm->kvm_fd, &cpuid) < 0)
		return -1;
	int r = ioctl(vm->vcpu_fd, KVM_SET_CPUID2, cpuid);
	free(cpuid);
	if (r < 0)
		return fail("KVM_SET_CPUID2: %s", strerror(errno));
	if (probe_msrs(vm) < 0)
		return -1;
	return 0;
}

int vm_attach_ram(struct vm *vm)
{
	struct kvm_userspace_memory_region r = {
		.slot = 0,
		.flags = 0,
		.guest_phys_addr = 0,
		.memory_size = vm->ram.size,
		.userspace_addr = (uint64_t)(uintptr_t)vm->ram.host,
	};
	if (xioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION (%zu bytes): %s",
			    vm->ram.size, strerror(errno));
	return 0;
}

void vm_destroy(struct vm *vm)
{
	if (vm->run)
		munmap(vm->run, vm->run_size);
	vm->run = NULL;
	if (vm->vcpu_fd >= 0)
		close(vm->vcpu_fd);
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	vm->vcpu_fd = vm->vm_fd = vm->kvm_fd = -1;
	ram_release(&vm->ram);
}

/* ------------------------------------------------------------ boot */
static void set_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code64)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->dpl = 0;
	s->s = 1;
	s->l = (uint8_t)code64;
	s->db = (uint8_t)!code64;
	s->g = 1;
}

int vm_boot_setup(struct vm *vm, const char *image_path)
{
	uint8_t *ram = vm->ram.host;
	int fd = open(image_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail("open %s: %s", image_path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) < 0) {
		close(fd);
		return fail("fstat %s: %s", image_path, strerror(errno));
	}
	if (st.st_size < GUEST_HDR_OFF + 24 ||
	    GUEST_LOAD_ADDR + (size_t)st.st_size > vm->ram.size) {
		close(fd);
		return fail("%s: bad size %lld", image_path, (long long)st.st_size);
	}
	size_t off = 0;
	while (off < (size_t)st.st_size) {
		ssize_t n = read(fd, ram + GUEST_LOAD_ADDR + off, (size_t)st.st_size - off);
		if (n <= 0) {
			close(fd);
			return fail("read %s: %s", image_path, n ? strerror(errno) : "short");
		}
		off += (size_t)n;
	}
	close(fd);
	const uint8_t *hdr = ram + GUEST_LOAD_ADDR + GUEST_HDR_OFF;
	if (memcmp(hdr, "SNAPGST1", 8) != 0)
		return fail("%s: no SNAPGST1 header at 0x%x", image_path, GUEST_HDR_OFF);
	uint64_t entry, end;
	memcpy(&entry, hdr + 8, 8);
	memcpy(&end, hdr + 16, 8);
	if (entry < GUEST_LOAD_ADDR || entry >= GUEST_LOAD_ADDR + (uint64_t)st.st_size ||
	    end > vm->ram.size)
		return fail("%s: bad entry 0x%llx / end 0x%llx", image_path,
			    (unsigned long long)entry, (unsigned long long)end);

	/* guest config flags: AVX only on request (see GUEST_FLAG_AVX) */
	uint64_t flags = vm->allow_avx ? GUEST_FLAG_AVX : 0;
	memcpy(ram + GUEST_LOAD_ADDR + GUEST_HDR_OFF + 24, &flags, 8);

	/* GDT: null, 0x08 code64, 0x10 data (the guest loads its own later) */
	uint64_t gdt[3] = {0, 0x00af9a000000ffffULL, 0x00cf92000000ffffULL};
	memcpy(ram + BOOT_GDT_ADDR, gdt, sizeof(gdt));

	/* identity map of 4 GiB with 2 MiB pages, user accessible (the guest
	   runs its main program in ring 3); MMIO range uncached */
	uint64_t *pml4 = (uint64_t *)(ram + PT_BASE);
	uint64_t *pdpt = (uint64_t *)(ram + PT_BASE + 0x1000);
	uint64_t *pd = (uint64_t *)(ram + PT_BASE + 0x2000);
	memset(pml4, 0, 6 * 4096);
	pml4[0] = (PT_BASE + 0x1000) | 7;
	for (int i = 0; i < 4; i++)
		pdpt[i] = (PT_BASE + 0x2000 + 0x1000UL * (unsigned)i) | 7;
	for (uint64_t i = 0; i < 2048; i++)   /* P RW US PS (+PWT PCD) */
		pd[i] = (i << 21) | 0x87 | (i >= 1536 ? 0x18 : 0);

	struct kvm_sregs sregs;
	if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS: %s", strerror(errno));
	set_seg(&sregs.cs, 0x08, 0xb, 1);
	set_seg(&sregs.ds, 0x10, 0x3, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = BOOT_GDT_ADDR;
	sregs.gdt.limit = sizeof(gdt) - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr0 = 0x80050033;       /* PG WP NE ET MP PE */
	sregs.cr3 = PT_BASE;
	sregs.cr4 = 0x20 | 0x200 | 0x400; /* PAE OSFXSR OSXMMEXCPT */
	sregs.efer = 0x500;           /* LME LMA */
	if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS (long mode): %s", strerror(errno));
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = entry;
	regs.rflags = 2;
	regs.rsp = GUEST_LOAD_ADDR; /* guest switches to its own stack */
	if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS: %s", strerror(errno));
	return 0;
}

/* ------------------------------------------------------------ run loop */
static __thread struct kvm_run *tls_run;

static void kick_handler(int sig)
{
	(void)sig;
	if (tls_run)
		tls_run->immediate_exit = 1;
}

static void install_kick_handler(void)
{
	static int done;
	if (done)
		return;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN gets EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	done = 1;
}

static void dump_regs(struct vm *vm)
{
	struct kvm_regs r;
	if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &r) == 0)
		fprintf(stderr, "  rip=%llx rsp=%llx rax=%llx rflags=%llx\n",
			(unsigned long long)r.rip, (unsigned long long)r.rsp,
			(unsigned long long)r.rax, (unsigned long long)r.rflags);
}

static int handle_io(struct vm *vm)
{
	struct kvm_run *run = vm->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;

	for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
		uint16_t port = run->io.port;
		int wr = run->io.direction == KVM_EXIT_IO_OUT;
		if (port >= UART_BASE && port < UART_BASE + UART_NPORTS && run->io.size == 1) {
			uart_io(&vm->uart, port, wr, data);
		} else if (!wr) {
			memset(data, 0xff, run->io.size); /* open bus */
		}
	}
	if (vm->uart.irq_error)
		return fail("KVM_IRQ_LINE(%d): %s", UART_IRQ, strerror(vm->uart.irq_error));
	return 0;
}

/* After KVM_RUN was interrupted: re-enter once with immediate_exit so that
   any half-done IN/OUT/MMIO is completed and the vCPU state is consistent. */
static int complete_pending(struct vm *vm)
{
	vm->run->immediate_exit = 1;
	int r = ioctl(vm->vcpu_fd, KVM_RUN, 0);
	int e = errno;
	vm->run->immediate_exit = 0;
	if (r == 0 || e == EINTR || e == EAGAIN)
		return 0;
	return fail("KVM_RUN (immediate_exit): %s", strerror(e));
}

static void *vcpu_loop(void *arg)
{
	struct vm *vm = arg;
	struct kvm_run *run = vm->run;

	tls_run = run;
	for (;;) {
		if (atomic_load(&vm->pause_req)) {
			if (complete_pending(vm) < 0)
				atomic_store(&vm->failed, 1);
			break;
		}
		int r = ioctl(vm->vcpu_fd, KVM_RUN, 0);
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN) {
				run->immediate_exit = 0;
				continue;
			}
			fail("KVM_RUN: %s", strerror(errno));
			atomic_store(&vm->failed, 1);
			break;
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			if (handle_io(vm) < 0) {
				atomic_store(&vm->failed, 1);
				goto out;
			}
			break;
		case KVM_EXIT_MMIO:
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
			if (vm->verbose)
				fprintf(stderr, "snapvm: unhandled MMIO %s 0x%llx\n",
					run->mmio.is_write ? "write" : "read",
					(unsigned long long)run->mmio.phys_addr);
			break;
		case KVM_EXIT_INTR:
			break;
		case KVM_EXIT_HLT:
			fail("guest HLT exit (irqchip should handle it)");
			atomic_store(&vm->failed, 1);
			goto out;
		case KVM_EXIT_SHUTDOWN:
			fail("guest shutdown (triple fault)");
			dump_regs(vm);
			atomic_store(&vm->failed, 1);
			goto out;
		case KVM_EXIT_FAIL_ENTRY:
			fail("KVM_EXIT_FAIL_ENTRY reason 0x%llx",
			     (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
			atomic_store(&vm->failed, 1);
			goto out;
		case KVM_EXIT_INTERNAL_ERROR:
			fail("KVM_EXIT_INTERNAL_ERROR suberror %u", run->internal.suberror);
			dump_regs(vm);
			atomic_store(&vm->failed, 1);
			goto out;
		default:
			fail("unexpected exit reason %u", run->exit_reason);
			dump_regs(vm);
			atomic_store(&vm->failed, 1);
			goto out;
		}
	}
out:
	tls_run = NULL;
	atomic_store(&vm->exited, 1);
	return NULL;
}

static void *io_loop(void *arg)
{
	struct vm *vm = arg;
	uint8_t buf[UART_FIFO_SIZE];

	while (!atomic_load(&vm->io_stop)) {
		int space = uart_rx_space(&vm->uart);
		if (space <= 0) {
			usleep(1000);
			continue;
		}
		struct pollfd p = {.fd = vm->in_fd, .events = POLLIN};
		int r = poll(&p, 1, 20);
		if (r < 0 && errno != EINTR)
			break;
		if (r <= 0)
			continue;
		ssize_t n = read(vm->in_fd, buf, (size_t)space);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0) {
			atomic_store(&vm->in_eof, 1);
			break;
		}
		uart_receive(&vm->uart, buf, (int)n);
		if (vm->uart.irq_error) {
			fail("KVM_IRQ_LINE: %s", strerror(vm->uart.irq_error));
			break;
		}
	}
	return NULL;
}

int vm_start(struct vm *vm)
{
	install_kick_handler();
	atomic_store(&vm->pause_req, 0);
	atomic_store(&vm->exited, 0);
	int e = pthread_create(&vm->vcpu_thread, NULL, vcpu_loop, vm);
	if (e)
		return fail("pthread_create vcpu: %s", strerror(e));
	vm->vcpu_thread_live = 1;
	if (vm->in_fd >= 0 && !vm->io_thread_live) {
		atomic_store(&vm->io_stop, 0);
		e = pthread_create(&vm->io_thread, NULL, io_loop, vm);
		if (e)
			return fail("pthread_create io: %s", strerror(e));
		vm->io_thread_live = 1;
	}
	return 0;
}

void vm_stop_io(struct vm *vm)
{
	if (!vm->io_thread_live)
		return;
	atomic_store(&vm->io_stop, 1);
	pthread_join(vm->io_thread, NULL);
	vm->io_thread_live = 0;
}

int vm_pause(struct vm *vm)
{
	vm_stop_io(vm);
	if (!vm->vcpu_thread_live)
		return 0;
	atomic_store(&vm->pause_req, 1);
	/* kick until the loop notices (bounded: 5 s) */
	for (int i = 0; i < 5000 && !atomic_load(&vm->exited); i++) {
		pthread_kill(vm->vcpu_thread, SIGUSR1);
		usleep(1000);
	}
	if (!atomic_load(&vm->exited))
		return fail("vCPU thread did not pause within 5 s");
	pthread_join(vm->vcpu_thread, NULL);
	vm->vcpu_thread_live = 0;
	return atomic_load(&vm->failed) ? -1 : 0;
}

int vm_wait_exited(struct vm *vm, int timeout_ms)
{
	for (int i = 0; i < timeout_ms && !atomic_load(&vm->exited); i++)
		usleep(1000);
	if (!atomic_load(&vm->exited))
		return -1;
	if (vm->vcpu_thread_live) {
		pthread_join(vm->vcpu_thread, NULL);
		vm->vcpu_thread_live = 0;
	}
	return 0;
}
