/*
 * snapvm - minimal KVM VMM standing in for libkrun while testing snapfmt.
 *
 *   snapvm run  [opts] guest.bin   boot; serial on stdin/stdout
 *   snapvm run  --restore [opts] guest.bin
 *                                  boot to READY, pause, save, restore into a
 *                                  fresh VM (RAM MAP_PRIVATE of the frozen
 *                                  template memfd); serial of the restored VM
 *                                  on stdin/stdout
 *   snapvm fork N [opts] guest.bin boot a template to READY, pause, save,
 *                                  then restore N children concurrently
 *                                  (one process each, serial over a
 *                                  socketpair) and check them; prints
 *                                  restore latencies
 * options:
 *   --mem MiB      guest RAM (default 256)
 *   --timeout S    hard limit for the whole command (default 60; 0 = none)
 *   --iters K      fork: repeat the N-children round K times (default 1)
 *   --comp N       fork: also run "COMP N" (N hex) in each child (default 20)
 *   --midway N MS  fork: snapshot the template MS ms into "COMP N" (hex)
 *                  instead of at READY; children and the resumed template
 *                  must print the same RESULT
 *   --eof-grace MS run: after stdin EOF keep running MS ms (default 1000)
 *   --avx          let the guest use AVX/YMM (breaks under kvm_pvm: off by default)
 *
 * snapshot files (through the snapfmt shim, shim/snapfmt_kvm.h):
 *   snapvm snapshot guest.bin OUT.snap   boot to READY (optionally --midway
 *                                  into a COMP), pause, write state + UART +
 *                                  RAM, commit, seal (mode 0444, mtime)
 *   snapvm restore SNAP            one child; serial on stdin/stdout; exit 2
 *                                  when the snapshot is refused
 *   snapvm fork N SNAP             N children from the file concurrently,
 *                                  checked (PONG, private WRITE, COMP,
 *                                  witness child), latency figures; the
 *                                  parent opens + verifies the file once,
 *                                  the children inherit the reader and only
 *                                  restore (--reopen: each child opens it)
 *   snapvm verify-restore SNAP OUT restore, then read all state back to OUT
 *   snapvm floor N SNAP            KVM floor: CREATE_VM + CREATE_VCPU +
 *                                  map + SET_USER_MEMORY_REGION alone, and
 *                                  the config floor: the same + TSS/identity
 *                                  map + CREATE_IRQCHIP + CREATE_PIT2 + the
 *                                  kvm_run mapping (snapvm's VM config)
 *   snapvm seal SNAP               chmod 0444 + mtime = metadata created
 *   -v             verbose
 */
#define _GNU_SOURCE
#include "vm.h"

#include "snapfmt_kvm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

struct opts {
	size_t mem;
	int timeout_s;
	int iters;
	unsigned comp;
	int eof_grace_ms;
	int restore;
	int verbose;
	int nchildren;
	unsigned midway;   /* fork: snapshot in the middle of COMP <midway> */
	int midway_ms;
	const char *image;
	const char *snap;      /* snapshot file (snapshot/restore/fork SNAP/floor) */
	const char *out;       /* verify-restore: where to write the re-read state */
	int no_seal;           /* snapshot: leave the file writable (tests) */
	int reopen;            /* fork N SNAP: every child opens + verifies the file */
};

static void usage(void)
{
	fprintf(stderr,
		"usage: snapvm run [--restore] [--mem MiB] [--timeout S] [--eof-grace MS] [-v] guest.bin\n"
		"       snapvm snapshot [--mem MiB] [--midway N MS] [--no-seal] guest.bin OUT.snap\n"
		"       snapvm restore [--timeout S] [--eof-grace MS] SNAP\n"
		"       snapvm fork N [--iters K] [--comp N] [--timeout S] [--reopen] SNAP\n"
		"       snapvm verify-restore SNAP OUT.snap\n"
		"       snapvm floor N SNAP\n"
		"       snapvm seal SNAP\n"
		"       snapvm fork N [--iters K] [--comp N] [--midway N MS] [--mem MiB] guest.bin  (in-memory)\n");
	exit(2);
}

static int g_allow_avx;

static void vm_init_struct(struct vm *vm, int verbose)
{
	memset(vm, 0, sizeof(*vm));
	vm->allow_avx = g_allow_avx;
	vm->kvm_fd = vm->vm_fd = vm->vcpu_fd = -1;
	vm->ram.fd = -1;
	vm->in_fd = -1;
	vm->verbose = verbose;
}

/* READY detector: pauses the template right after the guest's READY line */
static void on_line(struct uart *u, const char *line, void *opaque)
{
	struct vm *vm = opaque;
	(void)u;
	if (strcmp(line, "READY") == 0) {
		atomic_store(&vm->ready_seen, 1);
		if (vm->pause_on_ready)
			atomic_store(&vm->pause_req, 1);
	}
}

/* Boot a template VM with memfd RAM; serial in/out on io_fd (-1: none);
   runs until READY and pauses there.  */
static int boot_template(struct vm *vm, const struct opts *o, int in_fd, int out_fd)
{
	vm_init_struct(vm, o->verbose);
	if (vm_create(vm) < 0)
		return -1;
	if (ram_create_memfd(&vm->ram, o->mem) < 0)
		return -1;
	if (vm_attach_ram(vm) < 0 || vm_boot_setup(vm, o->image) < 0)
		return -1;
	vm->uart.out_fd = out_fd;
	vm->uart.line_cb = on_line;
	vm->uart.cb_opaque = vm;
	vm->in_fd = in_fd;
	vm->pause_on_ready = 1;
	uint64_t t0 = now_ns();
	if (vm_start(vm) < 0)
		return -1;
	if (vm_wait_exited(vm, 20000) < 0) {
		vm_pause(vm);
		return fail("template did not print READY within 20 s");
	}
	vm_stop_io(vm);
	if (atomic_load(&vm->failed) || !atomic_load(&vm->ready_seen))
		return fail("template failed before READY");
	vm->pause_on_ready = 0;
	if (o->verbose)
		fprintf(stderr, "snapvm: template READY after %.2f ms\n", (now_ns() - t0) / 1e6);
	return 0;
}

struct restore_times {
	uint64_t t_open, check_ns, create_ns, mem_ns, restore_ns;
};

/* Restore snapshot st into a fresh VM whose RAM is a MAP_PRIVATE view of
   ram_fd.  Opens its own /dev/kvm. */
static int restore_child(struct vm *vm, const struct opts *o, int ram_fd,
			 const struct vm_state *st, struct restore_times *t)
{
	vm_init_struct(vm, o->verbose);
	t->t_open = now_ns();
	if (vm_create(vm) < 0)
		return -1;
	uint64_t t1 = now_ns();
	if (ram_map_private(&vm->ram, ram_fd, 0, st->ram_size) < 0)
		return -1;
	if (vm_attach_ram(vm) < 0)
		return -1;
	uint64_t t2 = now_ns();
	if (vm_state_restore(vm, st) < 0)
		return -1;
	uint64_t t3 = now_ns();
	t->create_ns = t1 - t->t_open;
	t->mem_ns = t2 - t1;
	t->restore_ns = t3 - t2;
	return 0;
}

/* ------------------------------------------------------------ run */
/* Serve the VM's serial on stdin/stdout until it stops or stdin ends. */
static int serve_stdio(struct vm *vm, const struct opts *o)
{
	vm->uart.out_fd = STDOUT_FILENO;
	vm->in_fd = STDIN_FILENO;
	if (vm_start(vm) < 0)
		return 1;
	uint64_t eof_at = 0;
	for (;;) {
		if (atomic_load(&vm->exited))
			break;
		if (atomic_load(&vm->in_eof)) {
			if (!eof_at)
				eof_at = now_ns();
			else if (now_ns() - eof_at > (uint64_t)o->eof_grace_ms * 1000000ULL)
				break;
		}
		usleep(5000);
	}
	int failed = atomic_load(&vm->failed);
	if (vm_pause(vm) < 0)
		failed = 1;
	return failed ? 1 : 0;
}

static int cmd_run(const struct opts *o)
{
	struct vm tmpl, child, *vm;
	static struct vm_state st;

	if (o->restore) {
		/* template output is discarded; the restored child talks on stdio */
		if (boot_template(&tmpl, o, -1, -1) < 0)
			return 1;
		if (vm_state_save(&tmpl, &st) < 0)
			return 1;
		struct restore_times t;
		if (restore_child(&child, o, tmpl.ram.fd, &st, &t) < 0)
			return 1;
		fprintf(stderr, "snapvm: restored: create %.3f ms, memory %.3f ms, state %.3f ms\n",
			t.create_ns / 1e6, t.mem_ns / 1e6, t.restore_ns / 1e6);
		vm = &child;
	} else {
		vm = &tmpl;
		vm_init_struct(vm, o->verbose);
		if (vm_create(vm) < 0 || ram_create_memfd(&vm->ram, o->mem) < 0 ||
		    vm_attach_ram(vm) < 0 || vm_boot_setup(vm, o->image) < 0)
			return 1;
	}
	int rc = serve_stdio(vm, o);
	vm_destroy(vm);
	if (o->restore)
		vm_destroy(&tmpl);
	return rc;
}

/* ------------------------------------------------------------ fork */
struct peer {
	pid_t pid;
	int sock;
	char buf[1024];
	size_t len;
	uint64_t t_fork, t_pong;
	struct restore_times rt;
	int got_times;
	char pong[64];
	char result[64];   /* --midway: RESULT printed before the PONG */
};

/* Extract one line from p->buf if present. */
static int take_line(struct peer *p, char *out, size_t outsz)
{
	char *nl = memchr(p->buf, '\n', p->len);
	if (!nl)
		return 0;
	size_t n = (size_t)(nl - p->buf);
	size_t c = n < outsz - 1 ? n : outsz - 1;
	memcpy(out, p->buf, c);
	out[c] = 0;
	if (c && out[c - 1] == '\r')
		out[c - 1] = 0;
	memmove(p->buf, nl + 1, p->len - n - 1);
	p->len -= n + 1;
	return 1;
}

static int fill(struct peer *p, int timeout_ms)
{
	struct pollfd pf = {.fd = p->sock, .events = POLLIN};
	int r = poll(&pf, 1, timeout_ms);
	if (r <= 0)
		return r < 0 && errno != EINTR ? -1 : 0;
	if (p->len >= sizeof(p->buf) - 1)
		p->len = 0; /* garbage flood: drop */
	ssize_t n = read(p->sock, p->buf + p->len, sizeof(p->buf) - 1 - p->len);
	if (n <= 0)
		return -1;
	p->len += (size_t)n;
	return 1;
}

/* Handle harness meta lines ("#T ..."); returns 1 if line was meta. */
static int meta_line(struct peer *p, const char *line)
{
	unsigned long long a, b, c, d, e;
	if (sscanf(line, "#T open=%llu check=%llu create=%llu mem=%llu restore=%llu", &a, &e, &b,
		   &c, &d) == 5) {
		p->rt.t_open = a;
		p->rt.check_ns = e;
		p->rt.create_ns = b;
		p->rt.mem_ns = c;
		p->rt.restore_ns = d;
		p->got_times = 1;
		return 1;
	}
	if (sscanf(line, "#T open=%llu create=%llu mem=%llu restore=%llu", &a, &b, &c, &d) == 4) {
		p->rt.t_open = a;
		p->rt.create_ns = b;
		p->rt.mem_ns = c;
		p->rt.restore_ns = d;
		p->got_times = 1;
		return 1;
	}
	return line[0] == '#';
}

/* Read the next guest line (skipping meta lines) within timeout_ms. */
static int read_line(struct peer *p, char *out, size_t outsz, int timeout_ms)
{
	uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ULL;
	for (;;) {
		while (take_line(p, out, outsz)) {
			if (!meta_line(p, out))
				return 0;
		}
		uint64_t now = now_ns();
		if (now >= deadline)
			return fail("timeout waiting for a line from pid %d", (int)p->pid);
		if (fill(p, (int)((deadline - now) / 1000000ULL) + 1) < 0)
			return fail("peer pid %d closed its serial", (int)p->pid);
	}
}

static int send_cmd(struct peer *p, const char *cmd)
{
	size_t n = strlen(cmd);
	if (write(p->sock, cmd, n) != (ssize_t)n)
		return fail("write to pid %d: %s", (int)p->pid, strerror(errno));
	return 0;
}

/* send cmd, expect a reply line starting with prefix; reply copied out */
static int transact(struct peer *p, const char *cmd, const char *prefix, char *out, size_t outsz)
{
	if (send_cmd(p, cmd) < 0 || read_line(p, out, outsz, 10000) < 0)
		return -1;
	if (strncmp(out, prefix, strlen(prefix)) != 0)
		return fail("pid %d: '%.*s' -> '%s', expected %s...", (int)p->pid,
			    (int)strcspn(cmd, "\n"), cmd, out, prefix);
	return 0;
}

/* Close every fd except 0-2 and the ones in keep[]. */
static void close_fds_except(const int *keep, int nkeep)
{
	int fds[1024], n = 0;
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return;
	int dfd = dirfd(d);
	struct dirent *e;
	while ((e = readdir(d)) && n < 1024) {
		int fd = atoi(e->d_name);
		if (e->d_name[0] < '0' || e->d_name[0] > '9' || fd <= 2 || fd == dfd)
			continue;
		int k = 0;
		for (int i = 0; i < nkeep; i++)
			k |= keep[i] == fd;
		if (!k)
			fds[n++] = fd;
	}
	closedir(d);
	for (int i = 0; i < n; i++)
		close(fds[i]);
}

static int count_open_fds(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	while (readdir(d))
		n++;
	closedir(d);
	return n - 3; /* ".", "..", the dir fd itself */
}

/* Child process tail: run the restored VM with its serial on sock until the
   guest stops or the controller closes sock, then exit (4: could not start,
   5: the VM failed).  Never returns. */
static void serve_sock(struct vm *vm, int sock)
{
	vm->uart.out_fd = sock;
	vm->in_fd = sock;
	if (vm_start(vm) < 0)
		_exit(4);
	while (!atomic_load(&vm->exited) && !atomic_load(&vm->in_eof))
		usleep(2000);
	int rc = atomic_load(&vm->failed) ? 5 : 0;
	vm_pause(vm);
	vm_destroy(vm);
	close(sock);
	_exit(rc);
}

/* Child process: restore from the frozen template, serve serial on sock
   until the controller closes it. Never returns. */
static void child_process(const struct opts *o, int sock, int ram_fd, const struct vm_state *st)
{
	int keep[2] = {sock, ram_fd};
	close_fds_except(keep, 2);
	if (o->timeout_s)
		alarm((unsigned)o->timeout_s);

	struct vm vm;
	struct restore_times t;
	if (restore_child(&vm, o, ram_fd, st, &t) < 0)
		_exit(3);
	close(ram_fd); /* MAP_PRIVATE mapping keeps the memfd alive */
	int nfds = count_open_fds();
	dprintf(sock, "#T open=%llu create=%llu mem=%llu restore=%llu\n",
		(unsigned long long)t.t_open, (unsigned long long)t.create_ns,
		(unsigned long long)t.mem_ns, (unsigned long long)t.restore_ns);
	dprintf(sock, "#FDS %d\n", nfds);
	serve_sock(&vm, sock);
}

static int reap(struct peer *p)
{
	int status = 0;
	for (int i = 0; i < 5000; i++) {
		pid_t r = waitpid(p->pid, &status, WNOHANG);
		if (r == p->pid)
			return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		usleep(1000);
	}
	kill(p->pid, SIGKILL);
	waitpid(p->pid, &status, 0);
	return fail("child %d did not exit; killed", (int)p->pid);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void stats(const char *name, uint64_t *v, int n)
{
	if (n <= 0)
		return;
	qsort(v, (size_t)n, sizeof(v[0]), cmp_u64);
	printf("  %-22s median %8.3f ms  min %8.3f  max %8.3f  (n=%d)\n", name,
	       v[n / 2] / 1e6, v[0] / 1e6, v[n - 1] / 1e6, n);
}

static int stat_ticks(struct peer *p, unsigned long long *pit, unsigned long long *lapic)
{
	char line[256];
	if (transact(p, "STAT\n", "STAT ", line, sizeof(line)) < 0)
		return -1;
	if (sscanf(line, "STAT pit=%llx lapic=%llx", pit, lapic) != 2)
		return fail("bad STAT line '%s'", line);
	return 0;
}

/* Functional checks on one restored guest. */
static int check_guest(struct peer *p, unsigned idx, unsigned comp, char *result, size_t rsz)
{
	char line[256], cmd[64];
	unsigned long long pit0, lapic0, pit1, lapic1;

	snprintf(cmd, sizeof(cmd), "WRITE %x\n", 0xc0de0000u + idx);
	if (transact(p, cmd, "OK", line, sizeof(line)) < 0)
		return -1;
	if (stat_ticks(p, &pit0, &lapic0) < 0)
		return -1;
	snprintf(cmd, sizeof(cmd), "COMP %x\n", comp);
	if (transact(p, cmd, "RESULT ", line, sizeof(line)) < 0)
		return -1;
	snprintf(result, rsz, "%.40s", line + 7);
	usleep(50000);
	if (stat_ticks(p, &pit1, &lapic1) < 0)
		return -1;
	if (pit1 <= pit0 || lapic1 <= lapic0)
		return fail("pid %d: timers not ticking after restore (pit %llx->%llx lapic %llx->%llx)",
			    (int)p->pid, pit0, pit1, lapic0, lapic1);
	return 0;
}

/* Boot the template with its serial on a socketpair (tsv[1] the VM's end,
   tsv[0] ours, read through *tp) and read its serial up to the READY line;
   with print_info, the INFO lines before it are printed as
   "template: INFO ...". */
static int boot_template_sock(struct vm *tmpl, const struct opts *o, int tsv[2],
			      struct peer *tp, int print_info)
{
	char line[256];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, tsv) < 0)
		return fail("socketpair: %s", strerror(errno));
	*tp = (struct peer){.pid = getpid(), .sock = tsv[0]};
	if (boot_template(tmpl, o, tsv[1], tsv[1]) < 0)
		return -1;
	do {
		if (read_line(tp, line, sizeof(line), 1000) < 0)
			return fail("template: no READY line");
		if (print_info && !strncmp(line, "INFO ", 5))
			printf("template: %s\n", line);
	} while (strcmp(line, "READY") != 0);
	return 0;
}

/* ---- shared by `fork N guest.bin` (children restore from the frozen
   template) and `fork N SNAP` (children restore from the snapshot file) */
static void file_child(const struct opts *o, int sock, struct snapfmt_reader *shared);

/* What a forked child restores from: the template's saved state st and RAM
   memfd ram_fd, or (st NULL) the snapshot file through the reader the parent
   opened (shared; NULL with --reopen). */
struct child_src {
	const struct vm_state *st;
	int ram_fd;
	struct snapfmt_reader *shared;
};

/* Fork one child restoring from src, its serial on p->sock; *p is reset and
   p->t_fork taken just before the fork. */
static int spawn_child(const struct opts *o, struct peer *p, const struct child_src *src)
{
	int sv[2];
	memset(p, 0, sizeof(*p));        /* on any failure: no socket, no child */
	p->sock = -1;
	p->pid = -1;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return fail("socketpair: %s", strerror(errno));
	p->t_fork = now_ns();
	pid_t pid = fork();
	if (pid < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		return fail("fork: %s", strerror(e));
	}
	if (pid == 0) {
		if (src->st)
			child_process(o, sv[1], src->ram_fd, src->st);
		else
			file_child(o, sv[1], src->shared);
	}
	close(sv[1]);
	p->pid = pid;
	p->sock = sv[0];
	return 0;
}

/* What collect_pongs does with a RESULT line before a child's PONG (the
   COMP a --midway snapshot interrupted, finishing first). */
enum early_result {
	RESULT_UNEXPECTED, /* not a PONG: the child fails with "(bad)" */
	RESULT_KEEP,       /* kept in p->result */
	RESULT_KEEP_PRINT, /* kept, and printed as "child i: RESULT ..." */
};

/* Collect the PONGs (answers to the PING sent at spawn) of children
   peers[0..n) as they arrive, each timestamped on arrival in p->t_pong, for
   at most timeout_ns.  A child that closes its serial first gets pong
   "(dead)", one that answers another line "(bad)"; neither gets a t_pong.
   Meta lines are consumed ("#T" restore times, "#FDS" raises *max_fds). */
static void collect_pongs(struct peer *peers, int n, uint64_t timeout_ns,
			  enum early_result early, int *max_fds)
{
	if (n <= 0) /* never (main: 1..256); lets gcc see poll()'s size is sane */
		return;
	struct pollfd pf[n];
	char line[256];
	int pending = n;
	uint64_t deadline = now_ns() + timeout_ns;
	while (pending && now_ns() < deadline) {
		for (int i = 0; i < n; i++) {
			pf[i].fd = peers[i].pong[0] ? -1 : peers[i].sock;
			pf[i].events = POLLIN;
			pf[i].revents = 0;
		}
		if (poll(pf, (nfds_t)n, 100) < 0 && errno != EINTR)
			break;
		for (int i = 0; i < n; i++) {
			if (!(pf[i].revents & (POLLIN | POLLHUP)))
				continue;
			struct peer *p = &peers[i];
			ssize_t r = read(p->sock, p->buf + p->len, sizeof(p->buf) - 1 - p->len);
			uint64_t t = now_ns();
			if (r <= 0) {
				fail("child %d closed before PONG", (int)p->pid);
				snprintf(p->pong, sizeof(p->pong), "(dead)");
				pending--;
				continue;
			}
			p->len += (size_t)r;
			while (!p->pong[0] && take_line(p, line, sizeof(line))) {
				int fds;
				if (sscanf(line, "#FDS %d", &fds) == 1) {
					*max_fds = fds > *max_fds ? fds : *max_fds;
					continue;
				}
				if (meta_line(p, line))
					continue;
				if (early != RESULT_UNEXPECTED && !p->result[0] &&
				    !strncmp(line, "RESULT ", 7)) {
					snprintf(p->result, sizeof(p->result), "%.40s", line + 7);
					if (early == RESULT_KEEP_PRINT)
						printf("child %d: RESULT %s\n", i, p->result);
					continue;
				}
				if (strncmp(line, "PONG ", 5) != 0) {
					fail("child %d: expected PONG, got '%s'", (int)p->pid, line);
					snprintf(p->pong, sizeof(p->pong), "(bad)");
				} else {
					snprintf(p->pong, sizeof(p->pong), "%.40s", line + 5);
					p->t_pong = t;
				}
				pending--;
			}
		}
	}
}

/* 1 if the child answered PONG in time; else says so and returns 0 */
static int got_pong(const struct peer *p)
{
	if (p->t_pong)
		return 1;
	fail("child %d: no PONG", (int)p->pid);
	return 0;
}

/* Latency figures, one array per figure, one slot per child that answered */
enum { LAT_FORK, LAT_OPEN, LAT_CHECK, LAT_CREATE, LAT_MEM, LAT_STATE, LAT_TOTAL, NLAT };

/* Record child p's figures in slot k: fork -> PONG always; the restore
   breakdown when the child reported its "#T" times (no check= from a
   template child: 0). */
static void record_latency(uint64_t *lat[NLAT], int k, const struct peer *p)
{
	lat[LAT_FORK][k] = p->t_pong - p->t_fork;
	if (p->got_times) {
		lat[LAT_OPEN][k] = p->t_pong - p->rt.t_open;
		lat[LAT_CHECK][k] = p->rt.check_ns;
		lat[LAT_CREATE][k] = p->rt.create_ns;
		lat[LAT_MEM][k] = p->rt.mem_ns;
		lat[LAT_STATE][k] = p->rt.restore_ns;
		lat[LAT_TOTAL][k] = p->rt.check_ns + p->rt.create_ns + p->rt.mem_ns +
				    p->rt.restore_ns;
	}
}

/* One zeroed slot per child per round in every figure; 0 or -1 */
static int alloc_latency(uint64_t *lat[NLAT], int total)
{
	for (int k = 0; k < NLAT; k++)
		if (!(lat[k] = calloc((size_t)total, 8)))
			return fail("out of memory");
	return 0;
}

/* Print the figures of the nlat children that answered (sorts them); the
   snapshot check and the restore total only for `fork N SNAP` (file). */
static void print_latency(uint64_t *lat[NLAT], int nlat, const char *open_label, int file)
{
	stats("fork -> PONG", lat[LAT_FORK], nlat);
	stats(open_label, lat[LAT_OPEN], nlat);
	if (file)
		stats("  open+check snapshot", lat[LAT_CHECK], nlat);
	stats("  create VM+vCPU", lat[LAT_CREATE], nlat);
	stats("  map+memory region", lat[LAT_MEM], nlat);
	stats("  restore state", lat[LAT_STATE], nlat);
	if (file)
		stats("  restore total", lat[LAT_TOTAL], nlat);
}

static void free_latency(uint64_t *lat[NLAT])
{
	for (int k = 0; k < NLAT; k++)
		free(lat[k]);
}

/* Functional checks on every child: private writes, timers, deterministic
   COMP (results[i]: child i's RESULT, all equal).  0, or -1 at the first
   failure. */
static int check_children(struct peer *peers, int n, unsigned comp, char (*results)[64])
{
	char line[256];
	for (int i = 0; i < n; i++)
		if (check_guest(&peers[i], (unsigned)i, comp, results[i], 64) < 0)
			return -1;
	for (int i = 0; i < n; i++) {
		char want[32];
		snprintf(want, sizeof(want), "VALUE %016x", 0xc0de0000u + (unsigned)i);
		if (transact(&peers[i], "READ\n", "VALUE ", line, sizeof(line)) < 0)
			return -1;
		if (strcmp(line, want) != 0)
			return fail("child %d: READ '%s', want '%s' (writes leaked?)", i, line, want);
		if (strcmp(results[i], results[0]) != 0)
			return fail("child %d: COMP result %s != %s", i, results[i], results[0]);
	}
	return 0;
}

/* Close every child's serial (its VM sees EOF and the child exits) and reap
   it.  0, or -1 when one did not exit with 0. */
static int reap_children(struct peer *peers, int n)
{
	int ok = 1;
	for (int i = 0; i < n; i++) {
		close(peers[i].sock);
		int rc = reap(&peers[i]);
		if (rc != 0) {
			fail("child %d exited with %d", i, rc);
			ok = 0;
		}
	}
	return ok ? 0 : -1;
}

static int cmd_fork(const struct opts *o)
{
	struct vm tmpl;
	static struct vm_state st;
	int tsv[2];
	int ok = 1;
	char line[256], tmpl_pong[64] = "", tmpl_result[64] = "";

	struct peer tp;
	if (boot_template_sock(&tmpl, o, tsv, &tp, 1) < 0)
		return 1;
	char midway_result[64] = "";
	if (o->midway) {
		/* start a long COMP, freeze the template in the middle of it */
		char cmd[32];
		snprintf(cmd, sizeof(cmd), "COMP %x\n", o->midway);
		if (vm_start(&tmpl) < 0 || send_cmd(&tp, cmd) < 0)
			return 1;
		usleep((useconds_t)o->midway_ms * 1000);
		if (vm_pause(&tmpl) < 0)
			return fail("template: pause during COMP failed"), 1;
		if (fill(&tp, 0) > 0 && memchr(tp.buf, '\n', tp.len))
			return fail("template finished COMP before the snapshot (%.*s); raise --midway", (int)tp.len, tp.buf), 1;
		printf("template: paused %d ms into COMP %x\n", o->midway_ms, o->midway);
	}
	uint64_t ts0 = now_ns();
	if (vm_state_save(&tmpl, &st) < 0)
		return 1;
	printf("template: state saved in %.3f ms (%u MSRs, xsave %u bytes)\n",
	       (now_ns() - ts0) / 1e6, st.nmsrs, st.xsave_size);
	/* children must not inherit the template's mappings */
	if (madvise(tmpl.ram.host, tmpl.ram.size, MADV_DONTFORK) < 0 ||
	    madvise(tmpl.run, tmpl.run_size, MADV_DONTFORK) < 0)
		return fail("madvise(MADV_DONTFORK): %s", strerror(errno)), 1;
	fflush(stdout);
	fflush(stderr);

	int n = o->nchildren, total = n * o->iters;
	uint64_t *lat[NLAT];
	if (alloc_latency(lat, total) < 0)
		return 1;
	struct peer *peers = calloc((size_t)n, sizeof(*peers));
	char (*results)[64] = calloc((size_t)n, 64);
	if (!peers || !results)
		return fail("out of memory"), 1;
	int nlat = 0, max_fds = 0;
	const struct child_src src = {.st = &st, .ram_fd = tmpl.ram.fd};

	for (int it = 0; it < o->iters && ok; it++) {
		/* launch all children, PING each right away */
		for (int i = 0; i < n; i++) {
			if (spawn_child(o, &peers[i], &src) < 0)
				return 1;
			send_cmd(&peers[i], "PING\n");
		}
		/* collect PONGs as they arrive (timestamp on arrival) */
		collect_pongs(peers, n, 20000000000ULL, o->midway ? RESULT_KEEP : RESULT_UNEXPECTED,
			      &max_fds);
		for (int i = 0; i < n; i++) {
			struct peer *p = &peers[i];
			if (!got_pong(p)) {
				ok = 0;
				continue;
			}
			record_latency(lat, nlat++, p);
			if (strcmp(p->pong, peers[0].pong) != 0) {
				fail("child %d: PONG %s != child 0's %s", (int)p->pid, p->pong, peers[0].pong);
				ok = 0;
			}
			if (o->midway && (!p->result[0] || strcmp(p->result, peers[0].result))) {
				fail("child %d: midway RESULT '%s' != child 0's '%s'", (int)p->pid,
				     p->result, peers[0].result);
				ok = 0;
			}
		}
		/* functional checks: private writes, timers, deterministic COMP */
		if (ok && check_children(peers, n, o->comp, results) < 0)
			ok = 0;
		if (reap_children(peers, n) < 0)
			ok = 0;
		if (o->verbose)
			fprintf(stderr, "snapvm: iteration %d done\n", it);
	}

	/* resume the template: must give the same answers, and see none of the
	   children's writes */
	if (ok) {
		tmpl.in_fd = tsv[1];
		if (vm_start(&tmpl) < 0)
			return 1;
		unsigned long long pit, lapic;
		if (o->midway) {
			/* the template finishes the interrupted COMP too */
			if (read_line(&tp, line, sizeof(line), 30000) < 0 ||
			    strncmp(line, "RESULT ", 7) != 0) {
				fail("template: no RESULT after resuming COMP");
				ok = 0;
			} else {
				snprintf(midway_result, sizeof(midway_result), "%.40s", line + 7);
				if (strcmp(midway_result, peers[0].result) != 0) {
					fail("template RESULT %s != children's %s (midway)",
					     midway_result, peers[0].result);
					ok = 0;
				}
			}
		}
		if (ok && transact(&tp, "PING\n", "PONG ", line, sizeof(line)) < 0)
			ok = 0;
		else
			snprintf(tmpl_pong, sizeof(tmpl_pong), "%.40s", line + 5);
		if (ok && transact(&tp, "READ\n", "VALUE ", line, sizeof(line)) < 0)
			ok = 0;
		if (ok && strcmp(line, "VALUE 0000000000000000") != 0) {
			fail("template sees '%s' after children wrote", line);
			ok = 0;
		}
		char cmd[32];
		snprintf(cmd, sizeof(cmd), "COMP %x\n", o->comp);
		if (ok && transact(&tp, cmd, "RESULT ", line, sizeof(line)) < 0)
			ok = 0;
		else
			snprintf(tmpl_result, sizeof(tmpl_result), "%.40s", line + 7);
		if (ok && stat_ticks(&tp, &pit, &lapic) < 0)
			ok = 0;
		if (ok && strcmp(tmpl_pong, peers[0].pong) != 0) {
			fail("template PONG %s != children's %s", tmpl_pong, peers[0].pong);
			ok = 0;
		}
		if (ok && strcmp(tmpl_result, results[0]) != 0) {
			fail("template RESULT %s != children's %s", tmpl_result, results[0]);
			ok = 0;
		}
		vm_pause(&tmpl);
	}
	vm_destroy(&tmpl);
	close(tsv[0]);
	close(tsv[1]);

	printf("children: %d x %d iteration(s), PONG %s, RESULT(COMP %x) %s, max child fds %d\n",
	       n, o->iters, peers[0].pong, o->comp, results[0], max_fds);
	printf("template after resume: PONG %s RESULT %s\n", tmpl_pong, tmpl_result);
	if (o->midway)
		printf("midway COMP %x: children RESULT %s, template RESULT %s\n", o->midway,
		       peers[0].result, midway_result);
	print_latency(lat, nlat, "open(/dev/kvm) -> PONG", 0);
	printf("fork: %s\n", ok ? "OK" : "FAILED");
	free_latency(lat);
	free(peers);
	free(results);
	return ok ? 0 : 1;
}

/* ================================================================ snapfmt */
/*
 * Snapshot files through the shim -- exactly the calls the libkrun patches
 * make.  save: snapfmt_writer_create, snapfmt_kvm_save_metadata,
 * snapfmt_kvm_msr_list, snapfmt_kvm_pause_vcpu + snapfmt_kvm_save_vcpu,
 * snapfmt_kvm_save_vm, device sections (uart.8250), snapfmt_kvm_save_ram,
 * snapfmt_writer_commit, snapfmt_kvm_seal.  restore: snapfmt_kvm_open,
 * snapfmt_kvm_restore_ram, snapfmt_kvm_restore_vcpu, snapfmt_kvm_restore_vm,
 * device sections, snapfmt_kvm_close.
 */
_Static_assert(sizeof(struct uart_state) == 80, "uart.8250 section is struct uart_state v1");

static int shim_fail(const char *what, int err)
{
	const char *m = snapfmt_kvm_last_error();
	return fail("%s: %s%s%s", what, snapfmt_strerror(err), *m ? ": " : "", m);
}

struct save_stats {
	uint64_t state_ns, ram_ns, commit_ns, total_ns;
	uint32_t nmsrs;
};

/* Save a paused VM into path (no RAM when with_ram = 0: verify-restore). */
static int snap_save(struct vm *vm, const char *path, int with_ram, int seal, struct save_stats *ss)
{
	struct snapfmt_writer *w = NULL;
	uint32_t msrs[SNAPFMT_KVM_MAX_MSRS], n = 0;
	char mib[32];
	int err;

	memset(ss, 0, sizeof(*ss));
	uint64_t t0 = now_ns();
	snprintf(mib, sizeof(mib), "%zu", vm->ram.size >> 20);
	const char *kv[] = {"vcpus", "1", "memory_mib", mib, "guest", "snapfmt test guest (tools/guest)"};
	if ((err = snapfmt_writer_create(path, SNAPFMT_ARCH_X86_64, 4096, SNAPFMT_HDR_F_TEMPLATE, &w)))
		return fail("snapfmt_writer_create %s: %s (%s)", path, snapfmt_strerror(err),
			    strerror(errno));
	if ((err = snapfmt_kvm_save_metadata(w, "snapvm", "2", kv, 3, NULL)) ||
	    (err = snapfmt_kvm_msr_list(vm->kvm_fd, msrs, SNAPFMT_KVM_MAX_MSRS, &n)) ||
	    (err = snapfmt_kvm_pause_vcpu(vm->vcpu_fd, vm->run)) ||
	    (err = snapfmt_kvm_save_vcpu(w, vm->vcpu_fd, 0, msrs, n)) ||
	    (err = snapfmt_kvm_save_vm(w, vm->vm_fd))) {
		shim_fail("save", err);
		snapfmt_writer_abort(w);
		return -1;
	}
	struct uart_state us;
	uart_get_state(&vm->uart, &us);
	if ((err = snapfmt_writer_add(w, SNAPFMT_SEC_UART_8250, 0, SNAPFMT_SEC_F_CRITICAL,
				      UART_STATE_VERSION, &us, sizeof(us)))) {
		fail("save uart.8250: %s", snapfmt_strerror(err));
		snapfmt_writer_abort(w);
		return -1;
	}
	uint64_t t1 = now_ns();
	if (with_ram) {
		struct snapfmt_kvm_ram reg = {.gpa = 0, .size = vm->ram.size};
		uint64_t off = 0;
		if ((err = snapfmt_kvm_save_ram(w, vm->ram.fd, &off, &reg, 1))) {
			shim_fail("save RAM", err);
			snapfmt_writer_abort(w);
			return -1;
		}
	}
	uint64_t t2 = now_ns();
	if ((err = snapfmt_writer_commit(w)))
		return fail("snapfmt_writer_commit %s: %s (%s)", path, snapfmt_strerror(err),
			    strerror(errno));
	if (seal && (err = snapfmt_kvm_seal(path)))
		return shim_fail("seal", err);
	uint64_t t3 = now_ns();
	ss->state_ns = t1 - t0;
	ss->ram_ns = t2 - t1;
	ss->commit_ns = t3 - t2;
	ss->total_ns = t3 - t0;
	ss->nmsrs = n;
	return 0;
}

struct restore_ctx {
	struct snapfmt_reader *r;
	int err;
	uint64_t t_mem0, t_mem1;
};

/* vm_create hook: guest RAM before the irqchip (see vm.h pre_irqchip) */
static int restore_ram_hook(struct vm *vm, void *arg)
{
	struct restore_ctx *c = arg;
	struct snapfmt_kvm_ram regs[8];
	uint32_t nreg = 0;

	c->t_mem0 = now_ns();
	if ((c->err = snapfmt_kvm_restore_ram(c->r, vm->vm_fd, 0, regs, 8, &nreg)))
		return shim_fail("restore RAM", c->err);
	if (nreg != 1 || regs[0].gpa != 0) {
		for (uint32_t i = 0; i < nreg; i++)
			munmap(regs[i].host, regs[i].size);
		c->err = SNAPFMT_ERR_INVAL;
		return fail("snapshot has %u RAM regions; snapvm supports one at GPA 0", nreg);
	}
	vm->ram.host = regs[0].host;
	vm->ram.size = regs[0].size;
	vm->ram.fd = -1;
	vm->ram.is_private = 1;
	c->t_mem1 = now_ns();
	return 0;
}

/* Restore an opened (snapfmt_kvm_open, verified) snapshot into a fresh VM;
   r stays open.  t->t_open and t->check_ns are the caller's.  Returns 0, 2
   when the snapshot was refused (file changed since open), -1 otherwise. */
static int snap_restore_reader(struct vm *vm, struct snapfmt_reader *r, int verbose,
			       struct restore_times *t)
{
	struct restore_ctx c = {.r = r};
	struct snapfmt_section s;
	int err;

	vm_init_struct(vm, verbose);
	vm->for_restore = 1;
	uint64_t t1 = now_ns();
	vm->pre_irqchip = restore_ram_hook;
	vm->pre_irqchip_arg = &c;
	if (vm_create(vm) < 0)
		return c.err == SNAPFMT_ERR_CHANGED ? 2 : -1;
	uint64_t t3 = now_ns();
	/* spec 6.2: every vCPU, then the VM state */
	if ((err = snapfmt_kvm_restore_vcpu(c.r, vm->vcpu_fd, 0))) {
		shim_fail("restore vCPU 0", err);
		goto fail;
	}
	if ((err = snapfmt_kvm_restore_vm(c.r, vm->vm_fd))) {
		shim_fail("restore VM", err);
		goto fail;
	}
	if (snapfmt_find(c.r, SNAPFMT_SEC_UART_8250, 0, &s) || s.length != sizeof(struct uart_state) ||
	    s.version != UART_STATE_VERSION) {
		fail("snapshot has no uart.8250 v%d section of %zu bytes", UART_STATE_VERSION,
		     sizeof(struct uart_state));
		goto fail;
	}
	struct uart_state us;
	memcpy(&us, s.data, sizeof(us));
	uart_set_state(&vm->uart, &us);
	const char *note = snapfmt_kvm_last_note();
	if (*note && verbose)
		fprintf(stderr, "snapvm: note: %s\n", note);
	uint64_t t4 = now_ns();
	t->mem_ns = c.t_mem1 - c.t_mem0;
	t->create_ns = (t3 - t1) - t->mem_ns;
	t->restore_ns = t4 - t3;
	return 0;
fail:
	return -1;
}

/* Restore path into a fresh VM: open + verify + restore + close.  Returns 0,
   or 2 when the snapshot was refused (nothing started), or -1 on other
   failures. */
static int snap_restore(struct vm *vm, const char *path, int verbose, struct restore_times *t)
{
	struct snapfmt_reader *r;
	struct snapfmt_diag d;
	int err;

	t->t_open = now_ns();
	if ((err = snapfmt_kvm_open(path, 0, &r, &d))) {
		vm_init_struct(vm, verbose);
		shim_fail("restore refused", err);
		return 2;
	}
	t->check_ns = now_ns() - t->t_open;
	int rc = snap_restore_reader(vm, r, verbose, t);
	snapfmt_kvm_close(r);
	return rc;
}

/* ---- snapvm snapshot guest.bin OUT.snap */
static int cmd_snapshot(const struct opts *o)
{
	struct vm tmpl;
	int tsv[2];
	char line[256], pong[64] = "";

	struct peer tp;
	if (boot_template_sock(&tmpl, o, tsv, &tp, 0) < 0)
		return 1;
	/* heartbeat of the template: children must answer the same */
	if (vm_start(&tmpl) < 0 || transact(&tp, "PING\n", "PONG ", line, sizeof(line)) < 0)
		return 1;
	snprintf(pong, sizeof(pong), "%.40s", line + 5);
	if (o->midway) {
		char cmd[32];
		snprintf(cmd, sizeof(cmd), "COMP %x\n", o->midway);
		if (send_cmd(&tp, cmd) < 0)
			return 1;
		usleep((useconds_t)o->midway_ms * 1000);
	}
	if (vm_pause(&tmpl) < 0)
		return fail("template: pause failed"), 1;
	if (o->midway && fill(&tp, 0) > 0 && memchr(tp.buf, '\n', tp.len))
		return fail("template finished COMP before the snapshot (%.*s); raise --midway",
			    (int)tp.len, tp.buf), 1;
	struct save_stats ss;
	if (snap_save(&tmpl, o->snap, 1, !o->no_seal, &ss) < 0) {
		vm_destroy(&tmpl);
		return 1;
	}
	struct stat st;
	if (stat(o->snap, &st) < 0)
		return fail("stat %s: %s", o->snap, strerror(errno)), 1;
	/* RAM the guest touched: non-zero pages of the memfd */
	size_t used = 0;
	for (size_t off = 0; off < tmpl.ram.size; off += 4096) {
		const uint64_t *q = (const uint64_t *)(tmpl.ram.host + off);
		for (int i = 0; i < 512; i++)
			if (q[i]) {
				used += 4096;
				break;
			}
	}
	printf("template: PONG %s\n", pong);
	if (o->midway)
		printf("template: paused %d ms into COMP %x\n", o->midway_ms, o->midway);
	printf("snapshot: %s  file %lld bytes, on disk %lld bytes, guest RAM %zu MiB, non-zero %zu bytes\n",
	       o->snap, (long long)st.st_size, (long long)st.st_blocks * 512, tmpl.ram.size >> 20, used);
	printf("snapshot: write %.3f ms (state %.3f ms, %u MSRs; RAM %.3f ms; commit+seal %.3f ms)\n",
	       ss.total_ns / 1e6, ss.state_ns / 1e6, ss.nmsrs, ss.ram_ns / 1e6, ss.commit_ns / 1e6);
	vm_destroy(&tmpl);
	close(tsv[0]);
	close(tsv[1]);
	return 0;
}

/* ---- snapvm restore SNAP: one child, serial on stdio */
static int cmd_restore(const struct opts *o)
{
	struct vm vm;
	struct restore_times t;
	int r = snap_restore(&vm, o->snap, o->verbose, &t);
	if (r) {
		vm_destroy(&vm);
		return 2;
	}
	fprintf(stderr, "snapvm: restored %s: open+check %.3f ms, create %.3f ms, memory %.3f ms, "
		"state %.3f ms\n", o->snap, t.check_ns / 1e6, t.create_ns / 1e6, t.mem_ns / 1e6,
		t.restore_ns / 1e6);
	r = serve_stdio(&vm, o);
	vm_destroy(&vm);
	return r;
}

/* ---- snapvm verify-restore SNAP OUT: restore, then read every KVM state
   back (same shim save path, no RAM) into OUT for a section-by-section
   comparison; the vCPU never runs in between. */
static int cmd_verify_restore(const struct opts *o)
{
	struct vm vm;
	struct restore_times t;
	struct save_stats ss;
	int r = snap_restore(&vm, o->snap, o->verbose, &t);
	if (r) {
		vm_destroy(&vm);
		return 2;
	}
	r = snap_save(&vm, o->out, 0, 0, &ss) < 0 ? 1 : 0;
	vm_destroy(&vm);
	if (!r)
		printf("verify-restore: %s restored and read back into %s\n", o->snap, o->out);
	return r;
}

/* Child of `fork N SNAP`: restore from the reader the parent opened and
   verified once (inherited across fork(): the same read-only mapping and fd;
   snapfmt_kvm_restore_ram re-checks the file's identity), or with --reopen
   open + verify the file itself; serve the serial on sock.  Never returns. */
static void file_child(const struct opts *o, int sock, struct snapfmt_reader *shared)
{
	int keep[2] = {sock, shared ? snapfmt_reader_fd(shared) : -1};
	close_fds_except(keep, 2);
	if (o->timeout_s)
		alarm((unsigned)o->timeout_s);
	struct vm vm;
	struct restore_times t = {0};
	int r;
	if (shared) {
		t.t_open = now_ns();
		r = snap_restore_reader(&vm, shared, o->verbose, &t);
	} else
		r = snap_restore(&vm, o->snap, o->verbose, &t);
	if (r) {
		dprintf(sock, "#ERR restore failed\n");
		_exit(r == 2 ? 2 : 3);
	}
	dprintf(sock, "#T open=%llu check=%llu create=%llu mem=%llu restore=%llu\n",
		(unsigned long long)t.t_open, (unsigned long long)t.check_ns,
		(unsigned long long)t.create_ns, (unsigned long long)t.mem_ns,
		(unsigned long long)t.restore_ns);
	dprintf(sock, "#FDS %d\n", count_open_fds());
	serve_sock(&vm, sock);
}

/* ---- snapvm fork N SNAP: N children from one snapshot file, concurrently */
static int cmd_fork_file(const struct opts *o)
{
	int n = o->nchildren, total = n * o->iters, ok = 1, nlat = 0, max_fds = 0;
	char line[256];
	uint64_t *lat[NLAT];
	if (alloc_latency(lat, total) < 0)
		return 1;
	struct peer *peers = calloc((size_t)n, sizeof(*peers));
	char (*results)[64] = calloc((size_t)n, 64);
	if (!peers || !results)
		return fail("out of memory"), 1;
	/* open + verify the snapshot ONCE; every child restores from this reader */
	struct snapfmt_reader *shared = NULL;
	uint64_t open_ns = 0;
	if (!o->reopen) {
		struct snapfmt_diag d;
		uint64_t t0 = now_ns();
		int err = snapfmt_kvm_open(o->snap, 0, &shared, &d);
		if (err)
			return shim_fail("restore refused", err), 2;
		open_ns = now_ns() - t0;
	}
	const struct child_src src = {.shared = shared};

	for (int it = 0; it < o->iters && ok; it++) {
		for (int i = 0; i < n; i++)
			if (spawn_child(o, &peers[i], &src) < 0 || send_cmd(&peers[i], "PING\n") < 0)
				return 1;
		collect_pongs(peers, n, 30000000000ULL, RESULT_KEEP_PRINT, &max_fds);
		for (int i = 0; i < n; i++) {
			struct peer *p = &peers[i];
			if (!got_pong(p)) {
				ok = 0;
				continue;
			}
			printf("child %d: PONG %s\n", i, p->pong);
			record_latency(lat, nlat++, p);
			if (strcmp(p->pong, peers[0].pong) != 0) {
				fail("child %d: PONG %s != child 0's %s", i, p->pong, peers[0].pong);
				ok = 0;
			}
		}
		/* private writes, timers, deterministic COMP */
		if (ok && check_children(peers, n, o->comp, results) < 0)
			ok = 0;
		/* a fresh child restored while the others are still alive and have
		   written: must see the template's value, not theirs */
		if (ok) {
			struct peer w;
			if (spawn_child(o, &w, &src) < 0 || send_cmd(&w, "PING\n") < 0 ||
			    read_line(&w, line, sizeof(line), 10000) < 0)
				ok = 0;
			else {
				if (!strncmp(line, "RESULT ", 7) &&
				    read_line(&w, line, sizeof(line), 10000) < 0)
					ok = 0;
				if (ok && (strncmp(line, "PONG ", 5) || strcmp(line + 5, peers[0].pong))) {
					fail("witness child: '%s', want PONG %s", line, peers[0].pong);
					ok = 0;
				}
				if (ok && transact(&w, "READ\n", "VALUE ", line, sizeof(line)) < 0)
					ok = 0;
				else if (ok && strcmp(line, "VALUE 0000000000000000") != 0) {
					fail("witness child sees '%s' after the children wrote", line);
					ok = 0;
				} else if (ok)
					printf("witness child: %s (children's writes stayed private)\n", line);
			}
			if (w.sock >= 0)
				close(w.sock);
			if (w.pid > 0 && reap(&w) != 0)
				ok = 0;
		}
		if (reap_children(peers, n) < 0)
			ok = 0;
	}
	snapfmt_kvm_close(shared);
	printf("children: %d x %d iteration(s) from %s, PONG %s, RESULT(COMP %x) %s, max child fds %d\n",
	       n, o->iters, o->snap, peers[0].pong, o->comp, results[0], max_fds);
	if (shared)
		printf("  open+verify snapshot once in the parent: %.3f ms (%.3f ms per child)\n",
		       open_ns / 1e6, open_ns / 1e6 / (n * o->iters + (ok ? o->iters : 0)));
	else
		printf("  snapshot opened and verified in every child (--reopen)\n");
	print_latency(lat, nlat, "open(snapshot) -> PONG", 1);
	printf("fork: %s\n", ok ? "OK" : "FAILED");
	free_latency(lat);
	free(peers);
	free(results);
	return ok ? 0 : 1;
}

/* ---- snapvm floor N SNAP: the unavoidable KVM cost of one child, measured
   alone: open(/dev/kvm) + KVM_CREATE_VM + KVM_CREATE_VCPU + mmap(MAP_PRIVATE)
   of the snapshot's RAM + KVM_SET_USER_MEMORY_REGION, in N concurrent
   processes (like `fork N SNAP`).  Then the "config floor" in a second round
   of N processes: the same plus snapvm's VM configuration in vm_create()'s
   order (TSS + identity map, RAM, CREATE_IRQCHIP + CREATE_PIT2, vCPU, kvm_run
   mapping) -- not in the floor, but unavoidable for this VM.
   --iters K alternates K rounds of each. */
static uint64_t floor_once(const struct snapfmt_reader *r, int cfg)
{
	uint64_t t0 = now_ns(), dt = 0, len = 0, idmap = 0xfffbc000UL;
	struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int vmfd = kvm < 0 ? -1 : ioctl(kvm, KVM_CREATE_VM, 0), vcpu = -1, sz;
	void *p = NULL, *run;

	if (vmfd < 0)
		return 0;
	if (cfg && (ioctl(vmfd, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0 ||
		    ioctl(vmfd, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0))
		return 0;
	if (snapfmt_map_ram(r, 0, NULL, PROT_READ | PROT_WRITE, &p, &len))
		return 0;
	struct kvm_userspace_memory_region mr = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = len,
		.userspace_addr = (uint64_t)(uintptr_t)p};
	if (ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
		return 0;
	if (cfg && (ioctl(vmfd, KVM_CREATE_IRQCHIP, 0) < 0 ||
		    ioctl(vmfd, KVM_CREATE_PIT2, &pit) < 0))
		return 0;
	if ((vcpu = ioctl(vmfd, KVM_CREATE_VCPU, 0)) < 0)
		return 0;
	if (cfg) {
		sz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
		run = sz > 0 ? mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0)
			     : MAP_FAILED;
		if (run == MAP_FAILED)
			return 0;
	}
	dt = now_ns() - t0;
	return dt ? dt : 1;
}

/* One round: n concurrent processes, each one floor_once(cfg); durations
   appended to v[*nv...]. */
static int floor_round(const struct snapfmt_reader *r, int n, int cfg, uint64_t *v, int *nv)
{
	int ok = 1;
	int (*pp)[2] = calloc((size_t)n, sizeof(*pp));
	pid_t *pids = calloc((size_t)n, sizeof(*pids));
	if (!pp || !pids)
		return fail("out of memory");
	for (int i = 0; i < n; i++) {
		if (pipe2(pp[i], O_CLOEXEC) < 0)
			return fail("pipe: %s", strerror(errno));
		pids[i] = fork();
		if (pids[i] < 0)
			return fail("fork: %s", strerror(errno));
		if (pids[i] == 0) {
			alarm(30);
			uint64_t dt = floor_once(r, cfg);
			if (write(pp[i][1], &dt, 8) != 8)
				_exit(1);
			_exit(dt ? 0 : 1);
		}
		close(pp[i][1]);
	}
	for (int i = 0; i < n; i++) {
		uint64_t dt = 0;
		if (read(pp[i][0], &dt, 8) != 8 || !dt) {
			fail("floor child %d failed", i);
			ok = 0;
		} else
			v[(*nv)++] = dt;
		close(pp[i][0]);
		int status;
		waitpid(pids[i], &status, 0);
	}
	free(pp);
	free(pids);
	return ok ? 0 : -1;
}

static int cmd_floor(const struct opts *o)
{
	struct snapfmt_reader *r = NULL;
	int err = snapfmt_open(o->snap, 0, &r), n = o->nchildren, ok = 1, nv = 0, nc = 0;
	if (err)
		return fail("%s: %s", o->snap, snapfmt_strerror(err)), 2;
	size_t total = (size_t)n * (size_t)o->iters;
	uint64_t *v = calloc(total, 8), *vc = calloc(total, 8);
	if (!v || !vc)
		return fail("out of memory"), 1;
	for (int it = 0; it < o->iters && ok; it++)
		if (floor_round(r, n, 0, v, &nv) < 0 || floor_round(r, n, 1, vc, &nc) < 0)
			ok = 0;
	snapfmt_close(r);
	printf("floor: %d concurrent processes x %d round(s) from %s\n", n, o->iters, o->snap);
	stats("floor (create+map+region)", v, nv);
	stats("config floor (+irqchip+pit)", vc, nc);
	free(v);
	free(vc);
	return ok ? 0 : 1;
}

static int is_snapshot(const char *path)
{
	char m[8] = {0};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, m, 8);
	close(fd);
	return n == 8 && memcmp(m, SNAPFMT_MAGIC, 8) == 0;
}

int main(int argc, char **argv)
{
	struct opts o = {.mem = 256UL << 20, .timeout_s = 60, .iters = 1, .comp = 0x20,
			 .eof_grace_ms = 1000};
	const char *pos[2] = {NULL, NULL};
	int npos = 0;
	if (argc < 2)
		usage();
	const char *cmd = argv[1];
	int i = 2;
	if (!strcmp(cmd, "fork") || !strcmp(cmd, "floor")) {
		if (argc < 3)
			usage();
		o.nchildren = atoi(argv[2]);
		if (o.nchildren < 1 || o.nchildren > 256)
			return fail("%s: N must be 1..256", cmd), 2;
		i = 3;
	} else if (strcmp(cmd, "run") && strcmp(cmd, "snapshot") && strcmp(cmd, "restore") &&
		   strcmp(cmd, "verify-restore") && strcmp(cmd, "seal")) {
		usage();
	}
	for (; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--mem") && i + 1 < argc)
			o.mem = strtoul(argv[++i], NULL, 0) << 20;
		else if (!strcmp(a, "--timeout") && i + 1 < argc)
			o.timeout_s = atoi(argv[++i]);
		else if (!strcmp(a, "--iters") && i + 1 < argc)
			o.iters = atoi(argv[++i]);
		else if (!strcmp(a, "--comp") && i + 1 < argc)
			o.comp = (unsigned)strtoul(argv[++i], NULL, 16);
		else if (!strcmp(a, "--eof-grace") && i + 1 < argc)
			o.eof_grace_ms = atoi(argv[++i]);
		else if (!strcmp(a, "--midway") && i + 2 < argc) {
			o.midway = (unsigned)strtoul(argv[++i], NULL, 16);
			o.midway_ms = atoi(argv[++i]);
		} else if (!strcmp(a, "--restore"))
			o.restore = 1;
		else if (!strcmp(a, "--no-seal"))
			o.no_seal = 1;
		else if (!strcmp(a, "--reopen"))
			o.reopen = 1;
		else if (!strcmp(a, "--avx"))
			g_allow_avx = 1;
		else if (!strcmp(a, "-v"))
			o.verbose = 1;
		else if (a[0] != '-' && npos < 2)
			pos[npos++] = a;
		else
			usage();
	}
	if (o.mem < MEM_MIN || o.mem > MEM_MAX)
		return fail("--mem must be %lu..%lu MiB", MEM_MIN >> 20, MEM_MAX >> 20), 2;
	if (o.iters < 1)
		o.iters = 1;
	if (o.timeout_s > 0)
		alarm((unsigned)o.timeout_s); /* default SIGALRM action: terminate */
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(cmd, "snapshot")) {
		if (npos != 2)
			usage();
		o.image = pos[0];
		o.snap = pos[1];
		return cmd_snapshot(&o);
	}
	if (!strcmp(cmd, "verify-restore")) {
		if (npos != 2)
			usage();
		o.snap = pos[0];
		o.out = pos[1];
		return cmd_verify_restore(&o);
	}
	if (npos != 1)
		usage();
	if (!strcmp(cmd, "restore")) {
		o.snap = pos[0];
		return cmd_restore(&o);
	}
	if (!strcmp(cmd, "seal")) {
		int err = snapfmt_kvm_seal(pos[0]);
		return err ? (shim_fail("seal", err), 1) : 0;
	}
	if (!strcmp(cmd, "floor")) {
		o.snap = pos[0];
		return cmd_floor(&o);
	}
	if (!strcmp(cmd, "fork") && is_snapshot(pos[0])) {
		o.snap = pos[0];
		return cmd_fork_file(&o);
	}
	o.image = pos[0];
	return strcmp(cmd, "fork") == 0 ? cmd_fork(&o) : cmd_run(&o);
}
