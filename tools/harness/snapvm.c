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
 *   -v             verbose
 */
#define _GNU_SOURCE
#include "vm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
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
};

static void usage(void)
{
	fprintf(stderr,
		"usage: snapvm run [--restore] [--mem MiB] [--timeout S] [--eof-grace MS] [-v] guest.bin\n"
		"       snapvm fork N [--iters K] [--comp N] [--midway N MS] [--mem MiB] [--timeout S] [-v] guest.bin\n");
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
	uint64_t t_open, create_ns, mem_ns, restore_ns;
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
	vm_destroy(vm);
	if (o->restore)
		vm_destroy(&tmpl);
	return failed ? 1 : 0;
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
	unsigned long long a, b, c, d;
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
	vm.uart.out_fd = sock;
	vm.in_fd = sock;
	if (vm_start(&vm) < 0)
		_exit(4);
	while (!atomic_load(&vm.exited) && !atomic_load(&vm.in_eof))
		usleep(2000);
	int rc = atomic_load(&vm.failed) ? 5 : 0;
	vm_pause(&vm);
	vm_destroy(&vm);
	close(sock);
	_exit(rc);
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

static int cmd_fork(const struct opts *o)
{
	struct vm tmpl;
	static struct vm_state st;
	int tsv[2];
	int ok = 1;
	char line[256], tmpl_pong[64] = "", tmpl_result[64] = "";

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, tsv) < 0)
		return fail("socketpair: %s", strerror(errno)), 1;
	struct peer tp = {.pid = getpid(), .sock = tsv[0]};
	if (boot_template(&tmpl, o, tsv[1], tsv[1]) < 0)
		return 1;
	do {
		if (read_line(&tp, line, sizeof(line), 1000) < 0)
			return fail("template: no READY line"), 1;
		if (!strncmp(line, "INFO ", 5))
			printf("template: %s\n", line);
	} while (strcmp(line, "READY") != 0);
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
	uint64_t *lat_fork = calloc((size_t)total, 8), *lat_open = calloc((size_t)total, 8);
	uint64_t *lat_create = calloc((size_t)total, 8), *lat_mem = calloc((size_t)total, 8);
	uint64_t *lat_state = calloc((size_t)total, 8);
	struct peer *peers = calloc((size_t)n, sizeof(*peers));
	char (*results)[64] = calloc((size_t)n, 64);
	if (!lat_fork || !lat_open || !lat_create || !lat_mem || !lat_state || !peers || !results)
		return fail("out of memory"), 1;
	int nlat = 0, max_fds = 0;

	for (int it = 0; it < o->iters && ok; it++) {
		/* launch all children, PING each right away */
		for (int i = 0; i < n; i++) {
			int sv[2];
			if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
				return fail("socketpair: %s", strerror(errno)), 1;
			memset(&peers[i], 0, sizeof(peers[i]));
			peers[i].t_fork = now_ns();
			pid_t pid = fork();
			if (pid < 0)
				return fail("fork: %s", strerror(errno)), 1;
			if (pid == 0)
				child_process(o, sv[1], tmpl.ram.fd, &st);
			close(sv[1]);
			peers[i].pid = pid;
			peers[i].sock = sv[0];
			send_cmd(&peers[i], "PING\n");
		}
		/* collect PONGs as they arrive (timestamp on arrival) */
		int pending = n;
		uint64_t deadline = now_ns() + 20000000000ULL;
		while (pending && now_ns() < deadline) {
			struct pollfd pf[n];
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
						max_fds = fds > max_fds ? fds : max_fds;
						continue;
					}
					if (meta_line(p, line))
						continue;
					if (o->midway && !p->result[0] && !strncmp(line, "RESULT ", 7)) {
						snprintf(p->result, sizeof(p->result), "%.40s", line + 7);
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
		for (int i = 0; i < n; i++) {
			struct peer *p = &peers[i];
			if (!p->t_pong) {
				fail("child %d: no PONG", (int)p->pid);
				ok = 0;
				continue;
			}
			lat_fork[nlat] = p->t_pong - p->t_fork;
			if (p->got_times) {
				lat_open[nlat] = p->t_pong - p->rt.t_open;
				lat_create[nlat] = p->rt.create_ns;
				lat_mem[nlat] = p->rt.mem_ns;
				lat_state[nlat] = p->rt.restore_ns;
			}
			nlat++;
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
		for (int i = 0; i < n && ok; i++)
			if (check_guest(&peers[i], (unsigned)i, o->comp, results[i], 64) < 0)
				ok = 0;
		for (int i = 0; i < n && ok; i++) {
			char want[32];
			snprintf(want, sizeof(want), "VALUE %016x", 0xc0de0000u + (unsigned)i);
			if (transact(&peers[i], "READ\n", "VALUE ", line, sizeof(line)) < 0)
				ok = 0;
			else if (strcmp(line, want) != 0) {
				fail("child %d: READ '%s', want '%s' (writes leaked?)", i, line, want);
				ok = 0;
			}
			if (ok && strcmp(results[i], results[0]) != 0) {
				fail("child %d: COMP result %s != %s", i, results[i], results[0]);
				ok = 0;
			}
		}
		for (int i = 0; i < n; i++) {
			close(peers[i].sock);
			int rc = reap(&peers[i]);
			if (rc != 0) {
				fail("child %d exited with %d", i, rc);
				ok = 0;
			}
		}
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
	stats("fork -> PONG", lat_fork, nlat);
	stats("open(/dev/kvm) -> PONG", lat_open, nlat);
	stats("  create VM+vCPU", lat_create, nlat);
	stats("  map+memory region", lat_mem, nlat);
	stats("  restore state", lat_state, nlat);
	printf("fork: %s\n", ok ? "OK" : "FAILED");
	free(lat_fork);
	free(lat_open);
	free(lat_create);
	free(lat_mem);
	free(lat_state);
	free(peers);
	free(results);
	return ok ? 0 : 1;
}

int main(int argc, char **argv)
{
	struct opts o = {.mem = 256UL << 20, .timeout_s = 60, .iters = 1, .comp = 0x20,
			 .eof_grace_ms = 1000};
	if (argc < 2)
		usage();
	const char *cmd = argv[1];
	int i = 2;
	if (strcmp(cmd, "fork") == 0) {
		if (argc < 3)
			usage();
		o.nchildren = atoi(argv[2]);
		if (o.nchildren < 1 || o.nchildren > 64)
			return fail("fork: N must be 1..64"), 2;
		i = 3;
	} else if (strcmp(cmd, "run") != 0) {
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
		else if (!strcmp(a, "--avx"))
			g_allow_avx = 1;
		else if (!strcmp(a, "-v"))
			o.verbose = 1;
		else if (a[0] != '-' && !o.image)
			o.image = a;
		else
			usage();
	}
	if (!o.image)
		usage();
	if (o.mem < MEM_MIN || o.mem > MEM_MAX)
		return fail("--mem must be %lu..%lu MiB", MEM_MIN >> 20, MEM_MAX >> 20), 2;
	if (o.iters < 1)
		o.iters = 1;
	if (o.timeout_s > 0)
		alarm((unsigned)o.timeout_s); /* default SIGALRM action: terminate */
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	return strcmp(cmd, "fork") == 0 ? cmd_fork(&o) : cmd_run(&o);
}
