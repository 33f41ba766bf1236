/* SPDX-License-Identifier: MIT */
/*
 * snapfmt_fs.h -- the virtiofs.inode_map section (0x0301) in C: parse it
 * (bounds-checked, same structural rules as snapfmt/inode_map.py), iterate
 * its entries, and re-open / verify every entry under the shared directory.
 *
 * Layout (little-endian; see snapfmt/inode_map.py, the source of truth):
 *   header 64 bytes | entries[entry_count] x 72 | handles[handle_count] x 24 |
 *   mounts[mount_count] x 16 | strtab[strtab_len] | zero pad to 8
 * The string table is canonical: entry names in entry order, then mount
 * paths, back to back (offset of record k == sum of the lengths before it).
 *
 * Re-opening never leaves the shared directory: every path component is
 * opened with openat(parent_fd, name, O_PATH|O_NOFOLLOW|O_CLOEXEC) (plus
 * O_DIRECTORY for intermediate components), and a name that is empty, ".",
 * "..", longer than NAME_MAX or contains '/' or NUL is refused (-EINVAL)
 * before any system call.  A symlink swapped in for a directory fails with
 * -ENOTDIR (O_PATH|O_NOFOLLOW opens the link itself, O_DIRECTORY rejects it);
 * a symlink as the last component is opened as the link, never followed.
 *
 * Conventions: structural functions return 0 or a negative SNAPFMT_ERR_*
 * code (snapfmt.h); file-system functions return 0 or a negative errno.
 * No global state; a parsed map is read-only and may be shared by threads.
 */
#ifndef SNAPFMT_FS_H
#define SNAPFMT_FS_H

#include <stddef.h>
#include <stdint.h>

#include "snapfmt.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SNAPFMT_FS_HEADER_SIZE 64u
#define SNAPFMT_FS_ENTRY_SIZE 72u
#define SNAPFMT_FS_HANDLE_SIZE 24u
#define SNAPFMT_FS_MOUNT_SIZE 16u
#define SNAPFMT_FS_MAX_ENTRIES (1u << 23)
#define SNAPFMT_FS_MAX_HANDLES (1u << 20)
#define SNAPFMT_FS_MAX_MOUNTS 4096u
#define SNAPFMT_FS_NAME_MAX 255u
#define SNAPFMT_FS_MAX_DEPTH 2048u      /* PATH_MAX / 2 */
#define SNAPFMT_FS_ROOT_ID 1u
#define SNAPFMT_FS_NO_PARENT UINT32_MAX

#define SNAPFMT_FS_F_MNT_ID 0x1u          /* mnt_id fields are real */
#define SNAPFMT_FS_F_HARDLINK_DEDUP 0x2u  /* one nodeid per (dev, ino, mnt_id) */

/* A parsed map.  Pointers point into the caller's buffer (not copied); the
 * two index arrays are allocated by snapfmt_fs_map_parse. */
struct snapfmt_fs_map {
	const uint8_t *buf;
	size_t len;
	uint32_t entry_count, handle_count, mount_count, flags, strtab_len;
	uint64_t next_inode, next_handle, root_dev, root_ino, root_mnt_id;
	const uint8_t *entries, *handles, *mounts, *strtab;
	uint32_t root_index;   /* entry index of nodeid 1, or SNAPFMT_FS_NO_PARENT */
	uint32_t *parent_idx;  /* per entry: index of its parent entry, or NO_PARENT
				* (the root, or a parent nodeid not in the map) */
	uint32_t *by_nodeid;   /* entry indices sorted by nodeid; NULL if the entries
				* are already in ascending nodeid order */
	/* on a parse error: the field and section-relative byte offset */
	const char *err_field;
	uint64_t err_offset;
};

struct snapfmt_fs_entry {
	uint32_t index;        /* position in entries[] */
	uint64_t nodeid, parent;
	const uint8_t *name;   /* NOT NUL-terminated; name_len bytes */
	uint32_t name_len;
	uint64_t ino, dev, mnt_id, generation, refcount;
	uint32_t file_type;    /* st_mode & S_IFMT */
};

/* Structural checks (length, limits, canonical string table, zero padding)
 * and the nodeid index.  0, SNAPFMT_ERR_BADLENGTH, _LIMIT, _BADOFFSET,
 * _BADVALUE or _NOMEM.  On error nothing stays allocated. */
int snapfmt_fs_map_parse(struct snapfmt_fs_map *m, const void *buf, size_t len);
void snapfmt_fs_map_free(struct snapfmt_fs_map *m);

/* Entry i (SNAPFMT_ERR_NOTFOUND when i >= entry_count). */
int snapfmt_fs_entry_at(const struct snapfmt_fs_map *m, uint32_t i, struct snapfmt_fs_entry *e);
/* Entry index of a nodeid (O(log n)); SNAPFMT_ERR_NOTFOUND if absent. */
int snapfmt_fs_lookup(const struct snapfmt_fs_map *m, uint64_t nodeid, uint32_t *index);

/* Calls cb for every entry in order; stops at (and returns) the first
 * non-zero cb result. */
typedef int (*snapfmt_fs_entry_cb)(const struct snapfmt_fs_entry *e, void *ctx);
int snapfmt_fs_foreach(const struct snapfmt_fs_map *m, snapfmt_fs_entry_cb cb, void *ctx);

/* 0 if name can be ONE directory entry name, else -EINVAL. */
int snapfmt_fs_name_ok(const uint8_t *name, uint32_t len);

/* Relative path "a/b/c" of entry i ("" for the root) into buf (NUL
 * terminated).  Returns its length or -ELOOP (cycle / deeper than
 * MAX_DEPTH), -ENOENT (a parent is missing), -ENAMETOOLONG (buf too small),
 * -EINVAL (a name with NUL or '/'). */
int snapfmt_fs_path(const struct snapfmt_fs_map *m, uint32_t i, char *buf, size_t size);

/* Re-open entry i relative to rootfd, one component at a time (see above).
 * On success *fd_out is an O_PATH fd (caller closes) and 0 is returned;
 * else -errno: -EINVAL bad name, -ENOENT missing, -ENOTDIR / -ELOOP symlink
 * or non-directory where a directory is needed, -ELOOP parent cycle. */
int snapfmt_fs_reopen(const struct snapfmt_fs_map *m, int rootfd, uint32_t i, int *fd_out);

/* Per-entry verification result (same meaning as `snapfmt fs-check`). */
enum snapfmt_fs_status {
	SNAPFMT_FS_OK = 0,
	SNAPFMT_FS_MISSING,        /* fs-missing */
	SNAPFMT_FS_TYPE_CHANGED,   /* fs-type-changed (e.g. dir swapped for a symlink) */
	SNAPFMT_FS_REPLACED,       /* fs-replaced: same type, other inode */
	SNAPFMT_FS_MOUNT_CHANGED,  /* fs-mount-changed (warning) */
	SNAPFMT_FS_NOT_REACHED,    /* fs-not-reached: an ancestor failed */
	SNAPFMT_FS_BAD_NAME,       /* fs-bad-name: refused before any syscall */
	SNAPFMT_FS_UNREACHABLE,    /* fs-unreachable: not connected to the root */
	SNAPFMT_FS_IO_ERROR,       /* fs-io-error: any other errno */
};
const char *snapfmt_fs_status_name(int status);   /* "ok", "missing", ... */

struct snapfmt_fs_result {
	int status;             /* enum snapfmt_fs_status */
	int err;                /* 0 or the negative errno behind it */
	uint64_t ino, dev;      /* what was found (when it exists) */
	uint32_t file_type;
	uint64_t mnt_id;        /* 0 if unknown */
};

/* Verify every entry: the root against rootfd (REPLACED if its identity is
 * not root_ino/root_dev), then a depth-first walk re-opening each child
 * with openat from its parent's O_PATH fd (at most one fd per level), then
 * UNREACHABLE for entries the walk never met.  cb gets every entry exactly
 * once (non-zero from cb stops the walk and is returned).  Returns the
 * number of entries whose status is not OK / MOUNT_CHANGED, or a negative
 * SNAPFMT_ERR_NOMEM / -errno (rootfd unusable). */
typedef int (*snapfmt_fs_verify_cb)(const struct snapfmt_fs_entry *e,
				    const struct snapfmt_fs_result *r, void *ctx);
long snapfmt_fs_verify(const struct snapfmt_fs_map *m, int rootfd, snapfmt_fs_verify_cb cb,
		       void *ctx);

#ifdef __cplusplus
}
#endif
#endif
