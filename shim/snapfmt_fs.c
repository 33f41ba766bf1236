/* SPDX-License-Identifier: MIT */
/* snapfmt_fs.c -- virtiofs.inode_map parse / iterate / re-open / verify.
 * See snapfmt_fs.h for the rules. */
#define _GNU_SOURCE
#include "snapfmt_fs.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef STATX_MNT_ID
#define STATX_MNT_ID 0x00001000U
#endif

/* header field offsets */
enum {
	H_ENTRY_COUNT = 0, H_HANDLE_COUNT = 4, H_MOUNT_COUNT = 8, H_FLAGS = 12,
	H_STRTAB_LEN = 16, H_RESERVED0 = 20, H_NEXT_INODE = 24, H_NEXT_HANDLE = 32,
	H_ROOT_DEV = 40, H_ROOT_INO = 48, H_ROOT_MNT_ID = 56,
};
/* entry field offsets */
enum {
	E_NODEID = 0, E_PARENT = 8, E_NAME_OFF = 16, E_NAME_LEN = 20, E_INO = 24, E_DEV = 32,
	E_MNT_ID = 40, E_GENERATION = 48, E_REFCOUNT = 56, E_FILE_TYPE = 64,
};
/* mount field offsets */
enum { M_MNT_ID = 0, M_PATH_OFF = 8, M_PATH_LEN = 12 };

static inline const uint8_t *ent(const struct snapfmt_fs_map *m, uint32_t i)
{
	return m->entries + (size_t)i * SNAPFMT_FS_ENTRY_SIZE;
}

static inline uint64_t nodeid_at(const struct snapfmt_fs_map *m, uint32_t i)
{
	return snapfmt_get_le64(ent(m, i) + E_NODEID);
}

static int fail(struct snapfmt_fs_map *m, int err, const char *field, uint64_t off)
{
	free(m->parent_idx);
	free(m->by_nodeid);
	m->parent_idx = NULL;
	m->by_nodeid = NULL;
	m->err_field = field;
	m->err_offset = off;
	return err;
}

struct id_pair {
	uint64_t nodeid;
	uint32_t index;
};

static int cmp_pair(const void *a, const void *b)
{
	const struct id_pair *x = a, *y = b;
	if (x->nodeid != y->nodeid)
		return x->nodeid < y->nodeid ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

int snapfmt_fs_lookup(const struct snapfmt_fs_map *m, uint64_t nodeid, uint32_t *index)
{
	uint32_t lo = 0, hi = m->entry_count;

	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		uint32_t idx = m->by_nodeid ? m->by_nodeid[mid] : mid;
		uint64_t v = nodeid_at(m, idx);
		if (v < nodeid)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < m->entry_count) {
		uint32_t idx = m->by_nodeid ? m->by_nodeid[lo] : lo;
		if (nodeid_at(m, idx) == nodeid) {
			if (index)
				*index = idx;
			return 0;
		}
	}
	return SNAPFMT_ERR_NOTFOUND;
}

int snapfmt_fs_map_parse(struct snapfmt_fs_map *m, const void *buf, size_t len)
{
	const uint8_t *b = buf;
	uint64_t want, run, soff;
	uint32_t i, n;

	memset(m, 0, sizeof(*m));
	m->root_index = SNAPFMT_FS_NO_PARENT;
	if (!buf && len)
		return fail(m, SNAPFMT_ERR_INVAL, NULL, 0);
	if (len < SNAPFMT_FS_HEADER_SIZE)
		return fail(m, SNAPFMT_ERR_BADLENGTH, "length", 0);
	m->buf = b;
	m->len = len;
	m->entry_count = snapfmt_get_le32(b + H_ENTRY_COUNT);
	m->handle_count = snapfmt_get_le32(b + H_HANDLE_COUNT);
	m->mount_count = snapfmt_get_le32(b + H_MOUNT_COUNT);
	m->flags = snapfmt_get_le32(b + H_FLAGS);
	m->strtab_len = snapfmt_get_le32(b + H_STRTAB_LEN);
	m->next_inode = snapfmt_get_le64(b + H_NEXT_INODE);
	m->next_handle = snapfmt_get_le64(b + H_NEXT_HANDLE);
	m->root_dev = snapfmt_get_le64(b + H_ROOT_DEV);
	m->root_ino = snapfmt_get_le64(b + H_ROOT_INO);
	m->root_mnt_id = snapfmt_get_le64(b + H_ROOT_MNT_ID);
	if (m->entry_count > SNAPFMT_FS_MAX_ENTRIES)
		return fail(m, SNAPFMT_ERR_LIMIT, "entry_count", H_ENTRY_COUNT);
	if (m->handle_count > SNAPFMT_FS_MAX_HANDLES)
		return fail(m, SNAPFMT_ERR_LIMIT, "handle_count", H_HANDLE_COUNT);
	if (m->mount_count > SNAPFMT_FS_MAX_MOUNTS)
		return fail(m, SNAPFMT_ERR_LIMIT, "mount_count", H_MOUNT_COUNT);
	/* all terms are < 2^40: no overflow in 64 bits */
	soff = SNAPFMT_FS_HEADER_SIZE + (uint64_t)m->entry_count * SNAPFMT_FS_ENTRY_SIZE +
	       (uint64_t)m->handle_count * SNAPFMT_FS_HANDLE_SIZE +
	       (uint64_t)m->mount_count * SNAPFMT_FS_MOUNT_SIZE;
	want = soff + m->strtab_len + ((8 - m->strtab_len % 8) % 8);
	if (want != (uint64_t)len)
		return fail(m, SNAPFMT_ERR_BADLENGTH, "strtab_len", H_STRTAB_LEN);
	m->entries = b + SNAPFMT_FS_HEADER_SIZE;
	m->handles = m->entries + (size_t)m->entry_count * SNAPFMT_FS_ENTRY_SIZE;
	m->mounts = m->handles + (size_t)m->handle_count * SNAPFMT_FS_HANDLE_SIZE;
	m->strtab = b + soff;

	/* canonical string table */
	run = 0;
	for (i = 0; i < m->entry_count; i++) {
		const uint8_t *e = ent(m, i);
		if (snapfmt_get_le32(e + E_NAME_OFF) != run)
			return fail(m, SNAPFMT_ERR_BADOFFSET, "entries.name_off",
				    (uint64_t)(e - b) + E_NAME_OFF);
		run += snapfmt_get_le32(e + E_NAME_LEN);
	}
	for (i = 0; i < m->mount_count; i++) {
		const uint8_t *mt = m->mounts + (size_t)i * SNAPFMT_FS_MOUNT_SIZE;
		if (snapfmt_get_le32(mt + M_PATH_OFF) != run)
			return fail(m, SNAPFMT_ERR_BADOFFSET, "mounts.path_off",
				    (uint64_t)(mt - b) + M_PATH_OFF);
		run += snapfmt_get_le32(mt + M_PATH_LEN);
	}
	if (run != m->strtab_len)
		return fail(m, SNAPFMT_ERR_BADLENGTH, "strtab_len", H_STRTAB_LEN);
	for (uint64_t k = soff + m->strtab_len; k < len; k++)
		if (b[k])
			return fail(m, SNAPFMT_ERR_BADVALUE, "pad", k);

	/* nodeid index */
	n = m->entry_count;
	for (i = 1; i < n; i++)
		if (nodeid_at(m, i) <= nodeid_at(m, i - 1))
			break;
	if (n > 1 && i < n) {
		struct id_pair *pairs = malloc((size_t)n * sizeof(*pairs));
		m->by_nodeid = malloc((size_t)n * sizeof(*m->by_nodeid));
		if (!pairs || !m->by_nodeid) {
			free(pairs);
			return fail(m, SNAPFMT_ERR_NOMEM, NULL, 0);
		}
		for (i = 0; i < n; i++) {
			pairs[i].nodeid = nodeid_at(m, i);
			pairs[i].index = i;
		}
		qsort(pairs, n, sizeof(*pairs), cmp_pair);
		for (i = 0; i < n; i++)
			m->by_nodeid[i] = pairs[i].index;
		free(pairs);
	}
	m->parent_idx = malloc((size_t)(n ? n : 1) * sizeof(*m->parent_idx));
	if (!m->parent_idx)
		return fail(m, SNAPFMT_ERR_NOMEM, NULL, 0);
	for (i = 0; i < n; i++) {
		uint32_t p;
		m->parent_idx[i] = SNAPFMT_FS_NO_PARENT;
		if (nodeid_at(m, i) == SNAPFMT_FS_ROOT_ID) {
			if (m->root_index == SNAPFMT_FS_NO_PARENT)
				m->root_index = i;
			continue;
		}
		if (snapfmt_fs_lookup(m, snapfmt_get_le64(ent(m, i) + E_PARENT), &p) == 0)
			m->parent_idx[i] = p;
	}
	return 0;
}

void snapfmt_fs_map_free(struct snapfmt_fs_map *m)
{
	if (!m)
		return;
	free(m->parent_idx);
	free(m->by_nodeid);
	m->parent_idx = NULL;
	m->by_nodeid = NULL;
}

int snapfmt_fs_entry_at(const struct snapfmt_fs_map *m, uint32_t i, struct snapfmt_fs_entry *e)
{
	const uint8_t *p;

	if (i >= m->entry_count)
		return SNAPFMT_ERR_NOTFOUND;
	p = ent(m, i);
	e->index = i;
	e->nodeid = snapfmt_get_le64(p + E_NODEID);
	e->parent = snapfmt_get_le64(p + E_PARENT);
	e->name = m->strtab + snapfmt_get_le32(p + E_NAME_OFF);   /* canonical: in bounds */
	e->name_len = snapfmt_get_le32(p + E_NAME_LEN);
	e->ino = snapfmt_get_le64(p + E_INO);
	e->dev = snapfmt_get_le64(p + E_DEV);
	e->mnt_id = snapfmt_get_le64(p + E_MNT_ID);
	e->generation = snapfmt_get_le64(p + E_GENERATION);
	e->refcount = snapfmt_get_le64(p + E_REFCOUNT);
	e->file_type = snapfmt_get_le32(p + E_FILE_TYPE);
	return 0;
}

int snapfmt_fs_foreach(const struct snapfmt_fs_map *m, snapfmt_fs_entry_cb cb, void *ctx)
{
	struct snapfmt_fs_entry e;

	for (uint32_t i = 0; i < m->entry_count; i++) {
		int rc;
		snapfmt_fs_entry_at(m, i, &e);
		rc = cb(&e, ctx);
		if (rc)
			return rc;
	}
	return 0;
}

int snapfmt_fs_name_ok(const uint8_t *name, uint32_t len)
{
	if (len == 0 || len > SNAPFMT_FS_NAME_MAX)
		return -EINVAL;
	if (name[0] == '.' && (len == 1 || (len == 2 && name[1] == '.')))
		return -EINVAL;
	if (memchr(name, '/', len) || memchr(name, '\0', len))
		return -EINVAL;
	return 0;
}

/* Indices from the root's child down to i into chain (chain[0] nearest the
 * root).  Returns the depth or a negative errno. */
static int chain_of(const struct snapfmt_fs_map *m, uint32_t i, uint32_t *chain)
{
	uint32_t depth = 0, cur = i;

	if (i >= m->entry_count)
		return -EINVAL;
	while (nodeid_at(m, cur) != SNAPFMT_FS_ROOT_ID) {
		if (depth >= SNAPFMT_FS_MAX_DEPTH)
			return -ELOOP;
		chain[depth++] = cur;
		cur = m->parent_idx[cur];
		if (cur == SNAPFMT_FS_NO_PARENT)
			return -ENOENT;
	}
	for (uint32_t a = 0, z = depth ? depth - 1 : 0; a < z; a++, z--) {
		uint32_t t = chain[a];
		chain[a] = chain[z];
		chain[z] = t;
	}
	return (int)depth;
}

int snapfmt_fs_path(const struct snapfmt_fs_map *m, uint32_t i, char *buf, size_t size)
{
	uint32_t chain[SNAPFMT_FS_MAX_DEPTH];
	size_t pos = 0;
	int depth = chain_of(m, i, chain);

	if (depth < 0)
		return depth;
	if (size == 0)
		return -ENAMETOOLONG;
	for (int d = 0; d < depth; d++) {
		struct snapfmt_fs_entry e;
		snapfmt_fs_entry_at(m, chain[d], &e);
		if (memchr(e.name, '\0', e.name_len) || memchr(e.name, '/', e.name_len))
			return -EINVAL;
		if (pos + (d > 0) + e.name_len + 1 > size || pos + e.name_len > INT32_MAX)
			return -ENAMETOOLONG;
		if (d > 0)
			buf[pos++] = '/';
		memcpy(buf + pos, e.name, e.name_len);
		pos += e.name_len;
	}
	buf[pos] = '\0';
	return (int)pos;
}

/* openat one validated component; returns fd or -errno. */
static int open_component(int dirfd, const uint8_t *name, uint32_t len, int want_dir)
{
	char nm[SNAPFMT_FS_NAME_MAX + 1];
	int fd;

	if (snapfmt_fs_name_ok(name, len))
		return -EINVAL;
	memcpy(nm, name, len);
	nm[len] = '\0';
	fd = openat(dirfd, nm, O_PATH | O_NOFOLLOW | O_CLOEXEC | (want_dir ? O_DIRECTORY : 0));
	return fd < 0 ? -errno : fd;
}

int snapfmt_fs_reopen(const struct snapfmt_fs_map *m, int rootfd, uint32_t i, int *fd_out)
{
	uint32_t chain[SNAPFMT_FS_MAX_DEPTH];
	int depth = chain_of(m, i, chain);
	int cur = rootfd;

	*fd_out = -1;
	if (depth < 0)
		return depth;
	if (depth == 0) {
		int fd = fcntl(rootfd, F_DUPFD_CLOEXEC, 0);
		if (fd < 0)
			return -errno;
		*fd_out = fd;
		return 0;
	}
	for (int d = 0; d < depth; d++) {
		struct snapfmt_fs_entry e;
		int fd;
		snapfmt_fs_entry_at(m, chain[d], &e);
		fd = open_component(cur, e.name, e.name_len, d + 1 < depth);
		if (cur != rootfd)
			close(cur);
		if (fd < 0)
			return fd;
		cur = fd;
	}
	*fd_out = cur;
	return 0;
}

const char *snapfmt_fs_status_name(int status)
{
	static const char *const names[] = {
		"ok", "missing", "type-changed", "replaced", "mount-changed", "not-reached",
		"bad-name", "unreachable", "io-error",
	};
	if (status < 0 || (size_t)status >= sizeof(names) / sizeof(names[0]))
		return "unknown";
	return names[status];
}

static uint64_t mnt_id_of(int fd)
{
	struct statx sx;

	if (statx(fd, "", AT_EMPTY_PATH, STATX_MNT_ID, &sx) == 0 && (sx.stx_mask & STATX_MNT_ID))
		return sx.stx_mnt_id;
	return 0;
}

/* stat the opened fd and fill r for entry e. */
static void compare(const struct snapfmt_fs_map *m, const struct snapfmt_fs_entry *e, int fd,
		    struct snapfmt_fs_result *r)
{
	struct stat st;

	if (fstat(fd, &st) < 0) {
		r->status = SNAPFMT_FS_IO_ERROR;
		r->err = -errno;
		return;
	}
	r->ino = st.st_ino;
	r->dev = st.st_dev;
	r->file_type = st.st_mode & S_IFMT;
	if (r->file_type != e->file_type)
		r->status = SNAPFMT_FS_TYPE_CHANGED;
	else if (r->ino != e->ino || r->dev != e->dev)
		r->status = SNAPFMT_FS_REPLACED;
	else if ((m->flags & SNAPFMT_FS_F_MNT_ID) && e->mnt_id) {
		r->mnt_id = mnt_id_of(fd);
		if (r->mnt_id && r->mnt_id != e->mnt_id)
			r->status = SNAPFMT_FS_MOUNT_CHANGED;
	}
}

struct frame {
	uint32_t dir;     /* entry index */
	int fd;           /* O_PATH dir fd, or -1 when the dir failed */
	uint32_t next;    /* next position in kids[] */
	uint32_t end;
};

static int failed(int status)
{
	return status != SNAPFMT_FS_OK && status != SNAPFMT_FS_MOUNT_CHANGED;
}

long snapfmt_fs_verify(const struct snapfmt_fs_map *m, int rootfd, snapfmt_fs_verify_cb cb,
		       void *ctx)
{
	uint32_t n = m->entry_count;
	uint32_t *start = NULL, *kids = NULL, *fillpos = NULL;
	uint8_t *seen = NULL;
	struct frame *stack = NULL;
	size_t sp = 0, cap = 0;
	long bad = 0;
	int rc = 0;
	struct stat rst;

	if (fstat(rootfd, &rst) < 0)
		return -errno;
	if (!S_ISDIR(rst.st_mode))
		return -ENOTDIR;
	start = calloc((size_t)n + 2, sizeof(*start));
	kids = malloc((size_t)(n ? n : 1) * sizeof(*kids));
	fillpos = malloc(((size_t)n + 1) * sizeof(*fillpos));
	seen = calloc((size_t)(n ? n : 1), 1);
	if (!start || !kids || !fillpos || !seen) {
		rc = SNAPFMT_ERR_NOMEM;
		goto out;
	}
	/* CSR child lists (children in entry order) */
	for (uint32_t i = 0; i < n; i++)
		if (m->parent_idx[i] != SNAPFMT_FS_NO_PARENT)
			start[m->parent_idx[i] + 1]++;
	for (uint32_t i = 0; i < n; i++)
		start[i + 1] += start[i];
	memcpy(fillpos, start, ((size_t)n + 1) * sizeof(*fillpos));
	for (uint32_t i = 0; i < n; i++)
		if (m->parent_idx[i] != SNAPFMT_FS_NO_PARENT)
			kids[fillpos[m->parent_idx[i]]++] = i;

	if (m->root_index != SNAPFMT_FS_NO_PARENT) {
		struct snapfmt_fs_entry e;
		struct snapfmt_fs_result r = {0};
		uint32_t ri = m->root_index;

		snapfmt_fs_entry_at(m, ri, &e);
		seen[ri] = 1;
		r.ino = rst.st_ino;
		r.dev = rst.st_dev;
		r.file_type = rst.st_mode & S_IFMT;
		if (r.ino != m->root_ino || r.dev != m->root_dev)
			r.status = SNAPFMT_FS_REPLACED;
		bad += failed(r.status);
		if ((rc = cb(&e, &r, ctx)))
			goto out;
		cap = 64;
		stack = malloc(cap * sizeof(*stack));
		if (!stack) {
			rc = SNAPFMT_ERR_NOMEM;
			goto out;
		}
		stack[sp++] = (struct frame){ri, rootfd, start[ri], start[ri + 1]};
	}
	while (sp) {
		struct frame *f = &stack[sp - 1];
		struct snapfmt_fs_entry e;
		struct snapfmt_fs_result r = {0};
		uint32_t ci;
		int has_kids, cfd = -1;

		if (f->next == f->end) {
			if (f->fd >= 0 && f->fd != rootfd)
				close(f->fd);
			sp--;
			continue;
		}
		ci = kids[f->next++];
		seen[ci] = 1;
		snapfmt_fs_entry_at(m, ci, &e);
		has_kids = start[ci + 1] > start[ci];
		if (f->fd < 0) {
			r.status = SNAPFMT_FS_NOT_REACHED;
		} else if (snapfmt_fs_name_ok(e.name, e.name_len)) {
			r.status = SNAPFMT_FS_BAD_NAME;
			r.err = -EINVAL;
		} else {
			cfd = open_component(f->fd, e.name, e.name_len, 0);
			if (cfd < 0) {
				r.err = cfd;
				r.status = cfd == -ENOENT ? SNAPFMT_FS_MISSING : SNAPFMT_FS_IO_ERROR;
			} else {
				compare(m, &e, cfd, &r);
			}
		}
		bad += failed(r.status);
		if ((rc = cb(&e, &r, ctx))) {
			if (cfd >= 0)
				close(cfd);
			goto out;
		}
		if (!has_kids) {
			if (cfd >= 0)
				close(cfd);
			continue;
		}
		/* descend only through a verified directory (its O_PATH fd is the
		 * dirfd for the children); else the children are NOT_REACHED */
		if (cfd >= 0 && (failed(r.status) || r.file_type != S_IFDIR)) {
			close(cfd);
			cfd = -1;
		}
		if (sp == cap) {
			struct frame *ns = realloc(stack, 2 * cap * sizeof(*stack));
			if (!ns) {
				if (cfd >= 0)
					close(cfd);
				rc = SNAPFMT_ERR_NOMEM;
				goto out;
			}
			stack = ns;
			cap *= 2;
		}
		stack[sp++] = (struct frame){ci, cfd, start[ci], start[ci + 1]};
	}
	for (uint32_t i = 0; i < n; i++) {
		struct snapfmt_fs_entry e;
		struct snapfmt_fs_result r = {0};
		if (seen[i])
			continue;
		snapfmt_fs_entry_at(m, i, &e);
		r.status = SNAPFMT_FS_UNREACHABLE;
		r.err = -ENOENT;
		bad++;
		if ((rc = cb(&e, &r, ctx)))
			goto out;
	}
out:
	while (sp) {
		sp--;
		if (stack[sp].fd >= 0 && stack[sp].fd != rootfd)
			close(stack[sp].fd);
	}
	free(stack);
	free(start);
	free(kids);
	free(fillpos);
	free(seen);
	return rc ? rc : bad;
}
