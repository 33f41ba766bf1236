/* SPDX-License-Identifier: MIT */
/* Unit tests of snapfmt_fs.c: structural rules on crafted maps, lookups,
 * paths, hostile names, symlink swaps, and a mutation loop (run under
 * ASan+UBSan: no out-of-bounds read whatever the bytes). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "snapfmt_fs.h"
#include "tap.h"

struct ent {
	uint64_t nodeid, parent;
	const char *name;
	uint64_t ino, dev;
	uint32_t type;
};

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* canonical map bytes; caller frees */
static uint8_t *build(const struct ent *es, uint32_t n, size_t *len_out)
{
	size_t slen = 0, len;
	uint8_t *b, *p, *s;
	uint32_t off = 0;

	for (uint32_t i = 0; i < n; i++)
		slen += strlen(es[i].name);
	len = 64 + (size_t)n * 72 + slen + ((8 - slen % 8) % 8);
	b = calloc(1, len);
	if (!b)
		abort();
	put32(b + 0, n);
	put32(b + 16, (uint32_t)slen);
	put64(b + 24, 1000);
	put64(b + 40, es[0].dev);
	put64(b + 48, es[0].ino);
	s = b + 64 + (size_t)n * 72;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t nl = (uint32_t)strlen(es[i].name);
		p = b + 64 + (size_t)i * 72;
		put64(p + 0, es[i].nodeid);
		put64(p + 8, es[i].parent);
		put32(p + 16, off);
		put32(p + 20, nl);
		put64(p + 24, es[i].ino);
		put64(p + 32, es[i].dev);
		put64(p + 56, 1);
		put32(p + 64, es[i].type);
		memcpy(s + off, es[i].name, nl);
		off += nl;
	}
	*len_out = len;
	return b;
}

static const struct ent tree[] = {
	{1, 0, "", 100, 7, S_IFDIR},
	{2, 1, "a", 101, 7, S_IFDIR},
	{3, 2, "f", 102, 7, S_IFREG},
	{4, 1, "b", 103, 7, S_IFDIR},
	{5, 4, "g", 104, 7, S_IFREG},
};

static void test_structure(void)
{
	struct snapfmt_fs_map m;
	size_t len;
	uint8_t *b = build(tree, 5, &len);
	uint8_t *c;
	struct snapfmt_fs_entry e;
	uint32_t idx;
	char path[64];

	CHECK_EQ(snapfmt_fs_map_parse(&m, b, len), 0);
	CHECK_EQ(m.entry_count, 5);
	CHECK(m.by_nodeid == NULL);
	CHECK_EQ(m.root_index, 0);
	CHECK_EQ(m.parent_idx[2], 1);
	CHECK_EQ(m.parent_idx[0], SNAPFMT_FS_NO_PARENT);
	CHECK_EQ(snapfmt_fs_lookup(&m, 4, &idx), 0);
	CHECK_EQ(idx, 3);
	CHECK_EQ(snapfmt_fs_lookup(&m, 9, &idx), SNAPFMT_ERR_NOTFOUND);
	CHECK_EQ(snapfmt_fs_entry_at(&m, 4, &e), 0);
	CHECK_EQ(e.name_len, 1);
	CHECK(e.name[0] == 'g');
	CHECK_EQ(snapfmt_fs_entry_at(&m, 5, &e), SNAPFMT_ERR_NOTFOUND);
	CHECK_EQ(snapfmt_fs_path(&m, 4, path, sizeof(path)), 3);
	CHECK(strcmp(path, "b/g") == 0);
	CHECK_EQ(snapfmt_fs_path(&m, 0, path, sizeof(path)), 0);
	CHECK_EQ(snapfmt_fs_path(&m, 4, path, 3), -ENAMETOOLONG);
	snapfmt_fs_map_free(&m);

	/* every truncation is BADLENGTH, never a crash */
	for (size_t l = 0; l < len; l++) {
		c = malloc(l ? l : 1);
		memcpy(c, b, l);
		CHECK_EQ(snapfmt_fs_map_parse(&m, c, l), SNAPFMT_ERR_BADLENGTH);
		free(c);
	}
	/* limits before length */
	c = malloc(len);
	memcpy(c, b, len);
	put32(c + 0, SNAPFMT_FS_MAX_ENTRIES + 1);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_LIMIT);
	CHECK(strcmp(m.err_field, "entry_count") == 0);
	put32(c + 0, 5);
	put32(c + 4, SNAPFMT_FS_MAX_HANDLES + 1);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_LIMIT);
	put32(c + 4, 0);
	put32(c + 8, SNAPFMT_FS_MAX_MOUNTS + 1);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_LIMIT);
	put32(c + 8, 0);
	/* count inconsistent with length */
	put32(c + 0, 4);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_BADLENGTH);
	put32(c + 0, 5);
	/* name pointing outside / non-canonical */
	put32(c + 64 + 2 * 72 + 16, 0xFFFFFFF0u);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_BADOFFSET);
	CHECK_EQ(m.err_offset, 64 + 2 * 72 + 16);
	put32(c + 64 + 2 * 72 + 16, 1);
	/* name length running past the string table */
	put32(c + 64 + 4 * 72 + 20, 0x7FFFFFFFu);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_BADLENGTH);
	put32(c + 64 + 4 * 72 + 20, 1);
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), 0);
	snapfmt_fs_map_free(&m);
	/* non-zero padding */
	c[len - 1] = 1;
	CHECK_EQ(snapfmt_fs_map_parse(&m, c, len), SNAPFMT_ERR_BADVALUE);
	free(c);
	free(b);
}

static void test_unsorted_and_cycles(void)
{
	const struct ent es[] = {
		{1, 0, "", 100, 7, S_IFDIR},
		{9, 1, "d", 101, 7, S_IFDIR},
		{3, 9, "x", 102, 7, S_IFREG},
		{7, 8, "c1", 103, 7, S_IFDIR},   /* 7 <-> 8 cycle */
		{8, 7, "c2", 104, 7, S_IFDIR},
		{5, 42, "orphan", 105, 7, S_IFREG},
	};
	struct snapfmt_fs_map m;
	size_t len;
	uint8_t *b = build(es, 6, &len);
	uint32_t idx;
	char path[64];
	int fd;

	CHECK_EQ(snapfmt_fs_map_parse(&m, b, len), 0);
	CHECK(m.by_nodeid != NULL);
	CHECK_EQ(snapfmt_fs_lookup(&m, 3, &idx), 0);
	CHECK_EQ(idx, 2);
	CHECK_EQ(snapfmt_fs_lookup(&m, 9, &idx), 0);
	CHECK_EQ(idx, 1);
	CHECK_EQ(snapfmt_fs_path(&m, 2, path, sizeof(path)), 3);
	CHECK(strcmp(path, "d/x") == 0);
	CHECK_EQ(snapfmt_fs_path(&m, 3, path, sizeof(path)), -ELOOP);
	CHECK_EQ(snapfmt_fs_path(&m, 5, path, sizeof(path)), -ENOENT);
	CHECK_EQ(snapfmt_fs_reopen(&m, AT_FDCWD, 4, &fd), -ELOOP);
	CHECK_EQ(fd, -1);
	snapfmt_fs_map_free(&m);
	free(b);
}

static void test_names(void)
{
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"a", 1), 0);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"...", 3), 0);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)".", 1), -EINVAL);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"..", 2), -EINVAL);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"a/b", 3), -EINVAL);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"a\0b", 3), -EINVAL);
	CHECK_EQ(snapfmt_fs_name_ok((const uint8_t *)"", 0), -EINVAL);
	{
		uint8_t longname[256];
		memset(longname, 'x', sizeof(longname));
		CHECK_EQ(snapfmt_fs_name_ok(longname, 255), 0);
		CHECK_EQ(snapfmt_fs_name_ok(longname, 256), -EINVAL);
	}
}

/* real tree: hostile names and a swapped-in symlink fail cleanly */
static void test_reopen(void)
{
	char tmpl[] = "/tmp/snapfmt-fs-XXXXXX";
	char p[256];
	struct stat st_a, st_f, st_out;
	int root, fd;

	if (!mkdtemp(tmpl)) {
		CHECK(0);
		return;
	}
	snprintf(p, sizeof(p), "%s/a", tmpl);
	CHECK_EQ(mkdir(p, 0755), 0);
	snprintf(p, sizeof(p), "%s/a/f", tmpl);
	fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
	CHECK(fd >= 0);
	close(fd);
	snprintf(p, sizeof(p), "%s/outside", tmpl);   /* sibling of the shared dir's child */
	CHECK_EQ(mkdir(p, 0755), 0);
	snprintf(p, sizeof(p), "%s/a", tmpl);
	stat(p, &st_a);
	snprintf(p, sizeof(p), "%s/a/f", tmpl);
	stat(p, &st_f);
	snprintf(p, sizeof(p), "%s/outside", tmpl);
	stat(p, &st_out);

	struct ent es[] = {
		{1, 0, "", 0, 0, S_IFDIR},
		{2, 1, "a", st_a.st_ino, st_a.st_dev, S_IFDIR},
		{3, 2, "f", st_f.st_ino, st_f.st_dev, S_IFREG},
		{4, 2, "..", st_out.st_ino, st_out.st_dev, S_IFDIR},   /* a/.. */
		{5, 4, "outside", st_out.st_ino, st_out.st_dev, S_IFDIR},
		{6, 1, "x/y", 1, 1, S_IFREG},
	};
	struct snapfmt_fs_map m;
	size_t len;
	uint8_t *b;
	root = open(tmpl, O_PATH | O_DIRECTORY | O_CLOEXEC);
	CHECK(root >= 0);
	{
		struct stat rs;
		fstat(root, &rs);
		es[0].ino = rs.st_ino;
		es[0].dev = rs.st_dev;
	}
	b = build(es, 6, &len);
	CHECK_EQ(snapfmt_fs_map_parse(&m, b, len), 0);
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 2, &fd), 0);
	{
		struct stat s;
		fstat(fd, &s);
		CHECK_EQ(s.st_ino, st_f.st_ino);
		close(fd);
	}
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 3, &fd), -EINVAL);      /* ".." */
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 4, &fd), -EINVAL);      /* below ".." */
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 5, &fd), -EINVAL);      /* "x/y" */
	CHECK_EQ(fd, -1);
	/* swap directory a for a symlink to an outside directory */
	snprintf(p, sizeof(p), "%s/a", tmpl);
	{
		char q[256];
		snprintf(q, sizeof(q), "%s/a.old", tmpl);
		CHECK_EQ(rename(p, q), 0);
		CHECK_EQ(symlink("outside", p), 0);
		snprintf(q, sizeof(q), "%s/outside/f", tmpl);
		fd = open(q, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
		close(fd);
	}
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 2, &fd), -ENOTDIR);     /* a/f through the link */
	CHECK_EQ(snapfmt_fs_reopen(&m, root, 1, &fd), 0);            /* "a": the link itself */
	{
		struct stat s;
		fstat(fd, &s);
		CHECK(S_ISLNK(s.st_mode));
		close(fd);
	}
	snapfmt_fs_map_free(&m);
	free(b);
	close(root);
	{
		char cmd[300];
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpl);
		CHECK_EQ(system(cmd), 0);
	}
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int walk_cb(const struct snapfmt_fs_entry *e, void *ctx)
{
	const struct snapfmt_fs_map *m = ctx;
	char path[512];
	volatile uint8_t acc = 0;
	for (uint32_t k = 0; k < e->name_len; k++)
		acc ^= e->name[k];
	(void)snapfmt_fs_path(m, e->index, path, sizeof(path));
	return 0;
}

static void test_mutations(void)
{
	size_t len;
	uint8_t *b = build(tree, 5, &len);
	int ok = 0;
	for (int it = 0; it < 20000; it++) {
		uint8_t *c = malloc(len);
		struct snapfmt_fs_map m;
		memcpy(c, b, len);
		int flips = 1 + (int)(xorshift() % 4);
		for (int k = 0; k < flips; k++)
			c[xorshift() % len] ^= (uint8_t)(1u << (xorshift() % 8));
		size_t l = (xorshift() % 8 == 0) ? (size_t)(xorshift() % (len + 1)) : len;
		if (snapfmt_fs_map_parse(&m, c, l) == 0) {
			ok++;
			snapfmt_fs_foreach(&m, walk_cb, &m);
			snapfmt_fs_map_free(&m);
		}
		free(c);
	}
	CHECK(ok > 0);
	free(b);
}

int main(void)
{
	test_structure();
	test_unsorted_and_cycles();
	test_names();
	test_reopen();
	test_mutations();
	return tap_done("test_fs");
}
