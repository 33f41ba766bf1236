/* SPDX-License-Identifier: MIT */
/* fs_verify -- drive snapfmt_fs.c from the command line (used by
 * tests/test_fs_reopen.py and bench/bench_inode_map.py).
 *
 *   fs_verify verify  SECTION_FILE ROOT   one line per entry, in callback order:
 *                                         "<index> <nodeid> <status> <err> <path>"
 *                                         exit 0 all ok, 1 some not ok, 2 error
 *   fs_verify reopen  SECTION_FILE ROOT   "<index> <nodeid> <rc>" per entry
 *                                         (snapfmt_fs_reopen from the root)
 *   fs_verify iterate SECTION_FILE [N]    parse + N x foreach; prints timings
 *   fs_verify parse   SECTION_FILE        prints the parse result code
 *
 * SECTION_FILE holds the raw section bytes; "--snap FILE:DEVICE" instead
 * reads the virtiofs.inode_map section of device DEVICE from a snapshot
 * (via libsnapfmt).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "snapfmt.h"
#include "snapfmt_fs.h"

#ifndef SNAPFMT_SEC_VIRTIOFS_INODE_MAP
#define SNAPFMT_SEC_VIRTIOFS_INODE_MAP 0x0301u
#endif

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct input {
	void *map;
	size_t maplen;
	struct snapfmt_reader *reader;
	const void *data;
	size_t len;
};

static int load(const char *spec, struct input *in)
{
	memset(in, 0, sizeof(*in));
	if (strncmp(spec, "--snap=", 7) == 0) {
		char path[4096];
		const char *colon = strrchr(spec + 7, ':');
		struct snapfmt_section sec;
		int rc;
		if (!colon || (size_t)(colon - (spec + 7)) >= sizeof(path)) {
			fprintf(stderr, "--snap=FILE:DEVICE\n");
			return -1;
		}
		memcpy(path, spec + 7, (size_t)(colon - (spec + 7)));
		path[colon - (spec + 7)] = '\0';
		rc = snapfmt_open(path, 0, &in->reader);
		if (rc) {
			fprintf(stderr, "%s: %s\n", path, snapfmt_strerror(rc));
			return -1;
		}
		rc = snapfmt_find(in->reader, SNAPFMT_SEC_VIRTIOFS_INODE_MAP,
				  (uint32_t)strtoul(colon + 1, NULL, 0), &sec);
		if (rc) {
			fprintf(stderr, "%s: inode map: %s\n", path, snapfmt_strerror(rc));
			return -1;
		}
		in->data = sec.data;
		in->len = (size_t)sec.length;
		return 0;
	}
	int fd = open(spec, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		perror(spec);
		if (fd >= 0)
			close(fd);
		return -1;
	}
	in->maplen = (size_t)st.st_size;
	if (in->maplen) {
		in->map = mmap(NULL, in->maplen, PROT_READ, MAP_PRIVATE, fd, 0);
		if (in->map == MAP_FAILED) {
			perror("mmap");
			close(fd);
			return -1;
		}
	}
	close(fd);
	in->data = in->map;
	in->len = in->maplen;
	return 0;
}

static void unload(struct input *in)
{
	if (in->map)
		munmap(in->map, in->maplen);
	if (in->reader)
		snapfmt_close(in->reader);
}

struct vctx {
	const struct snapfmt_fs_map *m;
};

static int print_result(const struct snapfmt_fs_entry *e, const struct snapfmt_fs_result *r,
			void *ctx)
{
	const struct vctx *v = ctx;
	char path[8192];
	int pl = snapfmt_fs_path(v->m, e->index, path, sizeof(path));
	if (pl < 0)
		snprintf(path, sizeof(path), "<path error %d>", pl);
	printf("%u %llu %s %d /%s\n", e->index, (unsigned long long)e->nodeid,
	       snapfmt_fs_status_name(r->status), r->err, path);
	return 0;
}

static volatile uint64_t sink;

static int count_cb(const struct snapfmt_fs_entry *e, void *ctx)
{
	uint64_t *acc = ctx;
	*acc += e->nodeid ^ e->ino ^ e->name_len;
	return 0;
}

int main(int argc, char **argv)
{
	struct input in;
	struct snapfmt_fs_map m;
	int rc, ret = 0;

	if (argc < 3) {
		fprintf(stderr, "usage: %s verify|reopen|iterate|parse SECTION_FILE [ROOT|N]\n",
			argv[0]);
		return 2;
	}
	if (load(argv[2], &in))
		return 2;
	double t0 = now();
	rc = snapfmt_fs_map_parse(&m, in.data, in.len);
	double t1 = now();
	if (strcmp(argv[1], "parse") == 0) {
		printf("%d %s %llu\n", rc, m.err_field ? m.err_field : "-",
		       (unsigned long long)m.err_offset);
		snapfmt_fs_map_free(&m);
		unload(&in);
		return rc ? 1 : 0;
	}
	if (rc) {
		fprintf(stderr, "parse: %s (field %s, offset %llu)\n", snapfmt_strerror(rc),
			m.err_field ? m.err_field : "-", (unsigned long long)m.err_offset);
		unload(&in);
		return 2;
	}
	if (strcmp(argv[1], "iterate") == 0) {
		int reps = argc > 3 ? atoi(argv[3]) : 1;
		uint64_t acc = 0;
		double t2 = now();
		for (int k = 0; k < reps; k++)
			snapfmt_fs_foreach(&m, count_cb, &acc);
		double t3 = now();
		sink = acc;
		printf("entries %u parse_ms %.3f foreach_ms %.3f\n", m.entry_count,
		       (t1 - t0) * 1e3, (t3 - t2) * 1e3 / (reps > 0 ? reps : 1));
	} else if (argc >= 4 && strcmp(argv[1], "verify") == 0) {
		int root = open(argv[3], O_PATH | O_DIRECTORY | O_CLOEXEC);
		struct vctx v = {&m};
		if (root < 0) {
			perror(argv[3]);
			ret = 2;
		} else {
			long bad = snapfmt_fs_verify(&m, root, print_result, &v);
			close(root);
			ret = bad < 0 ? 2 : bad > 0;
			if (bad < 0)
				fprintf(stderr, "verify: %ld\n", bad);
		}
	} else if (argc >= 4 && strcmp(argv[1], "reopen") == 0) {
		int root = open(argv[3], O_PATH | O_DIRECTORY | O_CLOEXEC);
		if (root < 0) {
			perror(argv[3]);
			ret = 2;
		} else {
			for (uint32_t i = 0; i < m.entry_count; i++) {
				int fd = -1;
				struct snapfmt_fs_entry e;
				int r = snapfmt_fs_reopen(&m, root, i, &fd);
				snapfmt_fs_entry_at(&m, i, &e);
				printf("%u %llu %d\n", i, (unsigned long long)e.nodeid, r);
				if (r == 0)
					close(fd);
				else
					ret = 1;
			}
			close(root);
		}
	} else {
		fprintf(stderr, "unknown command %s\n", argv[1]);
		ret = 2;
	}
	snapfmt_fs_map_free(&m);
	unload(&in);
	return ret;
}
