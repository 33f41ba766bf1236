/* SPDX-License-Identifier: MIT */
/*
 * snapfmt.h -- C reader/writer for snapfmt v1 microVM snapshot files.
 *
 * The byte layout, constants and error codes come from the generated
 * snapfmt_layout.h (python -m snapfmt.codegen); this header is the API.
 *
 * Conventions
 *   - Every function returns 0 on success or a negative SNAPFMT_ERR_* code
 *     (snapfmt_strerror() gives the message).  SNAPFMT_ERR_IO leaves errno
 *     set by the failing system call.
 *   - No global mutable state.  A reader is immutable after snapfmt_open*()
 *     returns, so any number of threads may use one reader concurrently
 *     (find, iterate, verify_bulk, map_ram); snapfmt_close() must not race
 *     with them.  A writer is used by one thread at a time.
 *   - Memory: the read path allocates exactly one block per open: the handle
 *     plus an index array of 8 bytes per section (at most 512 KiB for the
 *     65536-section limit), used to check duplicates/overlaps and for
 *     O(log n) snapfmt_find().  Nothing is copied; section data pointers point
 *     into the mapping (snapfmt_open) or the caller's buffer
 *     (snapfmt_open_buffer), valid until snapfmt_close().
 *   - A file opened with snapfmt_open() is mapped read-only; if another
 *     process truncates it while mapped, accesses fault (SIGBUS) -- snapshot
 *     files are written once (atomic rename) and never modified in place.
 */
#ifndef SNAPFMT_H
#define SNAPFMT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "snapfmt_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- little-endian loads (any alignment) -------------------------------- */
static inline uint16_t snapfmt_get_le16(const void *p)
{
	const uint8_t *b = (const uint8_t *)p;
	return (uint16_t)(b[0] | b[1] << 8);
}
static inline uint32_t snapfmt_get_le32(const void *p)
{
	const uint8_t *b = (const uint8_t *)p;
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}
static inline uint64_t snapfmt_get_le64(const void *p)
{
	const uint8_t *b = (const uint8_t *)p;
	return (uint64_t)snapfmt_get_le32(b) | (uint64_t)snapfmt_get_le32(b + 4) << 32;
}

/* Message for a SNAPFMT_ERR_* code (or 0); never NULL. */
const char *snapfmt_strerror(int err);
/* "x86.regs" etc. for a known section type, NULL otherwise. */
const char *snapfmt_type_name(uint32_t type);
/* CRC32C (Castagnoli), zlib-style chaining: start with crc = 0. */
uint32_t snapfmt_crc32c(uint32_t crc, const void *buf, size_t len);

/* ---- reader ---------------------------------------------------------------- */

struct snapfmt_reader;

/* One section as seen through the table. */
struct snapfmt_section {
	uint32_t index;     /* position in the section table */
	uint32_t type;      /* SNAPFMT_SEC_* */
	uint32_t instance;  /* vCPU / device / RAM blob index */
	uint16_t version;   /* section layout version */
	uint16_t flags;     /* SNAPFMT_SEC_F_* */
	uint32_t crc;       /* CRC32C from the table */
	uint64_t offset;    /* byte offset in the file */
	uint64_t length;    /* byte length */
	const void *data;   /* offset's bytes in the mapping/buffer */
};

/* Where the first failed check was (for messages).  Optional out-param of
 * the *_diag openers; zeroed on success. */
struct snapfmt_diag {
	int code;          /* the returned SNAPFMT_ERR_* */
	int section;       /* table index, or -1 for the header / whole table */
	const char *field; /* header or table-entry field name, or NULL */
	uint64_t offset;   /* absolute byte offset of the problem */
	char message[256]; /* one line, with both ranges / values involved */
};

/* snapfmt_open flags */
#define SNAPFMT_OPEN_DEEP 0x1u /* also verify the CRC of every BULK section */

/* Open and verify a file (rules 1-20 of the spec; BULK CRCs only with
 * SNAPFMT_OPEN_DEEP).  The file is mapped read-only and its fd kept for
 * snapfmt_map_ram().  On error *out is NULL. */
int snapfmt_open(const char *path, unsigned flags, struct snapfmt_reader **out);
int snapfmt_open_diag(const char *path, unsigned flags, struct snapfmt_reader **out,
		      struct snapfmt_diag *diag);
/* Same over a caller-owned buffer (not copied; must outlive the reader). */
int snapfmt_open_buffer(const void *buf, size_t len, unsigned flags,
			struct snapfmt_reader **out);
int snapfmt_open_buffer_diag(const void *buf, size_t len, unsigned flags,
			     struct snapfmt_reader **out, struct snapfmt_diag *diag);
void snapfmt_close(struct snapfmt_reader *r);

/* Header values (already verified). */
struct snapfmt_info {
	uint32_t header_len;
	uint16_t version_major, version_minor, compat_major, compat_minor;
	uint16_t arch;             /* SNAPFMT_ARCH_* */
	uint32_t page_size;
	uint32_t flags;            /* SNAPFMT_HDR_F_* */
	uint32_t section_count;
	uint64_t table_offset;
	uint64_t file_size;
	uint32_t header_crc32c, table_crc32c;
};
void snapfmt_get_info(const struct snapfmt_reader *r, struct snapfmt_info *info);

uint32_t snapfmt_section_count(const struct snapfmt_reader *r);
/* i-th table entry; SNAPFMT_ERR_NOTFOUND when i >= count. */
int snapfmt_section_at(const struct snapfmt_reader *r, uint32_t i, struct snapfmt_section *sec);
/* Section by (type, instance); SNAPFMT_ERR_NOTFOUND if absent. */
int snapfmt_find(const struct snapfmt_reader *r, uint32_t type, uint32_t instance,
		 struct snapfmt_section *sec);
/* 1 if the section's bytes match its CRC, 0 if not. */
int snapfmt_section_crc_ok(const struct snapfmt_section *sec);
/* Rule 20 on demand for one section of a known kind: the fixed size and the
 * kind's whole length rule (spec/tables.md "Length rules"), including the
 * kinds whose rule the reader does not apply at open because Python checks
 * them only when decoding (arm64.hvf_vcpu).  0 for unknown kinds / BULK.
 * Returns 0, BADLENGTH, LIMIT, BADVALUE or BADOFFSET -- the code Python's
 * decoder raises first for the same bytes. */
int snapfmt_section_check(const struct snapfmt_section *sec);
/* The fd of a reader opened with snapfmt_open*() from a path (kept for
 * snapfmt_map_ram(); owned by the reader), -1 for buffer readers. */
int snapfmt_reader_fd(const struct snapfmt_reader *r);
/* Deep verify: CRC of every BULK section; SNAPFMT_ERR_BADCRC names the first
 * bad one in *bad_index (may be NULL). */
int snapfmt_verify_bulk(const struct snapfmt_reader *r, uint32_t *bad_index);
/* mmap(MAP_PRIVATE) the RAM section `instance` (type SNAPFMT_SEC_RAM) from the
 * file: copy-on-write guest memory.  addr_hint is passed to mmap as a hint
 * (no MAP_FIXED); prot is PROT_*.  Unmap with munmap(*out, section length).
 * Buffer-opened readers: SNAPFMT_ERR_INVAL.  The section offset is a multiple
 * of the snapshot page size, which must be a multiple of the host page size
 * (else SNAPFMT_ERR_IO, errno EINVAL). */
int snapfmt_map_ram(const struct snapfmt_reader *r, uint32_t instance, void *addr_hint,
		    int prot, void **out, uint64_t *len_out);

/* ---- writer ----------------------------------------------------------------- */

struct snapfmt_writer;

/* Start a file: creates a temp file "<dir>/.<name>.XXXXXX.tmp" beside path
 * (O_EXCL).  arch SNAPFMT_ARCH_*, page_size one of SNAPFMT_PAGE_SIZES, flags
 * SNAPFMT_HDR_F_* (unknown must-understand bits: SNAPFMT_ERR_BADFLAGS). */
int snapfmt_writer_create(const char *path, uint16_t arch, uint32_t page_size, uint32_t flags,
			  struct snapfmt_writer **out);
/* Append a section (written immediately at the next 8-aligned offset, or
 * page-aligned for SNAPFMT_SEC_F_BULK, whose length must be a multiple of
 * page_size and whose all-zero pages become holes).  Errors: DUPLICATE,
 * BADFLAGS, LIMIT, BADALIGN, IO.  After an IO error the writer only accepts
 * snapfmt_writer_abort(). */
int snapfmt_writer_add(struct snapfmt_writer *w, uint32_t type, uint32_t instance, uint16_t flags,
		       uint16_t version, const void *buf, uint64_t len);
/* Append guest RAM as a RAM section (CRITICAL|BULK, version 1), read from ptr
 * if non-NULL, else pread() from fd at fd_offset (holes of a sparse fd are
 * skipped with SEEK_DATA/SEEK_HOLE).  Zero pages are not written and their
 * CRC is extended arithmetically, not recomputed byte by byte. */
int snapfmt_writer_add_ram(struct snapfmt_writer *w, uint32_t instance, const void *ptr, int fd,
			   uint64_t fd_offset, uint64_t len);
/* Write table + header, fsync, rename over path, fsync the directory.
 * Frees w in all cases (on failure the temp file is removed). */
int snapfmt_writer_commit(struct snapfmt_writer *w);
/* Drop everything: unlink the temp file, free w. */
void snapfmt_writer_abort(struct snapfmt_writer *w);

#ifdef __cplusplus
}
#endif
#endif /* SNAPFMT_H */
