/* SPDX-License-Identifier: MIT */
/*
 * snapfmt.c -- reader and writer of snapfmt v1 containers.
 *
 * The reader applies the normative check order of the spec (rules 1-20, the
 * same order and codes as snapfmt/container.py); the first failing check
 * decides the error.  Every read of the input goes through the small named
 * bounds predicates below after the range was proven inside the input, with
 * overflow-safe arithmetic (no a + b > c on untrusted values).
 *
 * The writer produces the canonical layout byte for byte like the Python
 * writer: header (64 bytes), sections in insertion order at the next offset
 * aligned to 8 (page_size for BULK), zero padding, table aligned to 8.
 */
#define _GNU_SOURCE
#include "snapfmt.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"

/* ---- generated tables ---------------------------------------------------- */

struct kind_desc {
	uint32_t type;
	const char *name;
	uint16_t default_flags, version;
	uint8_t shape, rule_at_open;
	uint64_t fixed_size;
	uint32_t rule_first, rule_count;
};

#define KIND_ROW(id, ty, nm, fl, ver, sh, fx, rf, rn, ro) \
	{ ty, nm, fl, ver, sh, ro, fx, rf, rn },
static const struct kind_desc kinds[] = { SNAPFMT_SECTION_KINDS(KIND_ROW) };
#define N_KINDS (sizeof(kinds) / sizeof(kinds[0]))

/* One step of a kind's length rule (see SNAPFMT_LENGTH_RULE_ROWS). */
struct rule_row {
	uint8_t op, width;
	uint16_t off;
	uint64_t a, b, c;
};

#define RULE_ROW(op_, w_, off_, a_, b_, c_) { op_, w_, off_, a_, b_, c_ },
static const struct rule_row rule_rows[SNAPFMT_LENGTH_RULE_ROW_COUNT + 1] = {
	SNAPFMT_LENGTH_RULE_ROWS(RULE_ROW)
	{ 0, 0, 0, 0, 0, 0 }
};

/* kinds[] is sorted by type id (the generator sorts it). */
static const struct kind_desc *kind_lookup(uint32_t type)
{
	size_t lo = 0, hi = N_KINDS;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (kinds[mid].type == type)
			return &kinds[mid];
		if (kinds[mid].type < type)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

const char *snapfmt_type_name(uint32_t type)
{
	const struct kind_desc *k = kind_lookup(type);

	return k ? k->name : NULL;
}

#define ERR_MSG(name, val, msg) [val] = msg,
static const char *const err_msgs[SNAPFMT_ERR_MAX + 1] = { SNAPFMT_ERROR_LIST(ERR_MSG) };

const char *snapfmt_strerror(int err)
{
	if (err == 0)
		return "success";
	if (err < 0 && -err <= SNAPFMT_ERR_MAX && err_msgs[-err])
		return err_msgs[-err];
	return "unknown error";
}

/* ---- bounds predicates (all overflow-safe) -------------------------------- */

/* v is a multiple of a (a a power of two) */
static bool is_aligned(uint64_t v, uint64_t a)
{
	return (v & (a - 1)) == 0;
}

/* [off, off + len) lies within [lo, hi] */
static bool range_inside(uint64_t off, uint64_t len, uint64_t lo, uint64_t hi)
{
	return lo <= off && off <= hi && len <= hi - off;
}

/* [a, a + alen) and [b, b + blen) share a byte; both already proven inside the
 * input, so the sums cannot overflow */
static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static bool page_size_ok(uint32_t ps)
{
#define PS_EQ(v) || ps == (v)
	return false SNAPFMT_PAGE_SIZES(PS_EQ);
#undef PS_EQ
}

static bool arch_ok(uint32_t arch)
{
#define ARCH_EQ(id, nm) || arch == (id)
	return false SNAPFMT_ARCH_NAMES(ARCH_EQ);
#undef ARCH_EQ
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) & ~(a - 1);
}

/* ---- reader ----------------------------------------------------------------- */

struct snapfmt_reader {
	const uint8_t *base;      /* whole input */
	uint64_t size;
	int fd;                   /* file readers only, else -1 */
	void *map;                /* mmap of the file, or NULL */
	struct snapfmt_info info;
	const uint8_t *table;     /* base + table_offset */
	uint32_t count;
	uint32_t *by_key;         /* indices sorted by (type, instance) */
	uint32_t idx[];           /* 2 * count: by_key, then scratch by offset */
};

static int fail(struct snapfmt_diag *d, int code, int section, const char *field,
		uint64_t offset, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

static int fail(struct snapfmt_diag *d, int code, int section, const char *field,
		uint64_t offset, const char *fmt, ...)
{
	va_list ap;

	if (!d)
		return code;
	d->code = code;
	d->section = section;
	d->field = field;
	d->offset = offset;
	va_start(ap, fmt);
	vsnprintf(d->message, sizeof(d->message), fmt, ap);
	va_end(ap);
	return code;
}

static const uint8_t *entry(const struct snapfmt_reader *r, uint32_t i)
{
	return r->table + (uint64_t)i * SNAPFMT_TABLE_ENTRY_SIZE;
}

#define ENT32(e, f) snapfmt_get_le32((e) + SNAPFMT_ENT_OFF_##f)
#define ENT16(e, f) snapfmt_get_le16((e) + SNAPFMT_ENT_OFF_##f)
#define ENT64(e, f) snapfmt_get_le64((e) + SNAPFMT_ENT_OFF_##f)

/* Rules 1-15: header and table placement.  Fills *info. */
static int check_header(const uint8_t *b, uint64_t n, struct snapfmt_info *h,
			struct snapfmt_diag *d)
{
	static const uint8_t zero4[4];
	uint32_t crc, unknown;
	uint64_t tlen;

	if (n < SNAPFMT_HEADER_SIZE)
		return fail(d, SNAPFMT_ERR_TRUNCATED, -1, NULL, n,
			    "input is %llu bytes, the header alone needs %u",
			    (unsigned long long)n, SNAPFMT_HEADER_SIZE);
	if (memcmp(b, SNAPFMT_MAGIC, SNAPFMT_MAGIC_LEN))
		return fail(d, SNAPFMT_ERR_BADMAGIC, -1, "magic", 0, "magic is not \"SNAPFMT\\0\"");
	h->header_len = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_HEADER_LEN);
	if (h->header_len < SNAPFMT_HEADER_SIZE || h->header_len > SNAPFMT_MAX_HEADER_LEN ||
	    !is_aligned(h->header_len, 8))
		return fail(d, SNAPFMT_ERR_BADHEADER, -1, "header_len", SNAPFMT_HDR_OFF_HEADER_LEN,
			    "header_len %u not a multiple of 8 in [%u, %u]", h->header_len,
			    SNAPFMT_HEADER_SIZE, SNAPFMT_MAX_HEADER_LEN);
	if (n < h->header_len)
		return fail(d, SNAPFMT_ERR_TRUNCATED, -1, "header_len", n,
			    "input is %llu bytes, header_len says %u", (unsigned long long)n,
			    h->header_len);
	h->header_crc32c = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_HEADER_CRC32C);
	crc = snapfmt_crc32c(0, b, SNAPFMT_HDR_OFF_HEADER_CRC32C);
	crc = snapfmt_crc32c(crc, zero4, 4);
	crc = snapfmt_crc32c(crc, b + SNAPFMT_HDR_OFF_HEADER_CRC32C + 4,
			     h->header_len - SNAPFMT_HDR_OFF_HEADER_CRC32C - 4);
	if (crc != h->header_crc32c)
		return fail(d, SNAPFMT_ERR_BADCRC, -1, "header_crc32c", SNAPFMT_HDR_OFF_HEADER_CRC32C,
			    "header CRC32C 0x%08x != stored 0x%08x", crc, h->header_crc32c);
	h->version_major = snapfmt_get_le16(b + SNAPFMT_HDR_OFF_VERSION_MAJOR);
	h->version_minor = snapfmt_get_le16(b + SNAPFMT_HDR_OFF_VERSION_MINOR);
	h->compat_major = snapfmt_get_le16(b + SNAPFMT_HDR_OFF_COMPAT_MAJOR);
	h->compat_minor = snapfmt_get_le16(b + SNAPFMT_HDR_OFF_COMPAT_MINOR);
	{
		uint32_t ver = (uint32_t)h->version_major << 16 | h->version_minor;
		uint32_t compat = (uint32_t)h->compat_major << 16 | h->compat_minor;
		uint32_t rmin = SNAPFMT_READER_MIN_VERSION_MAJOR << 16 | SNAPFMT_READER_MIN_VERSION_MINOR;
		uint32_t rver = SNAPFMT_VERSION_MAJOR << 16 | SNAPFMT_VERSION_MINOR;

		if (ver < rmin || compat > rver || compat > ver)
			return fail(d, SNAPFMT_ERR_BADVERSION, -1, "version_major",
				    SNAPFMT_HDR_OFF_VERSION_MAJOR,
				    "file version %u.%u (readable by >= %u.%u); this reader is %u.%u "
				    "and reads files >= %u.%u", h->version_major, h->version_minor,
				    h->compat_major, h->compat_minor, SNAPFMT_VERSION_MAJOR,
				    SNAPFMT_VERSION_MINOR, SNAPFMT_READER_MIN_VERSION_MAJOR,
				    SNAPFMT_READER_MIN_VERSION_MINOR);
	}
	for (uint32_t i = SNAPFMT_HEADER_SIZE; i < h->header_len; i++)
		if (b[i])
			return fail(d, SNAPFMT_ERR_BADHEADER, -1, "trailing", i,
				    "header byte %u is non-zero (bytes [%u, %u) must be zero)", i,
				    SNAPFMT_HEADER_SIZE, h->header_len);
	if (snapfmt_get_le16(b + SNAPFMT_HDR_OFF_RESERVED0))
		return fail(d, SNAPFMT_ERR_BADHEADER, -1, "reserved0", SNAPFMT_HDR_OFF_RESERVED0,
			    "reserved0 is %u, must be 0", snapfmt_get_le16(b + SNAPFMT_HDR_OFF_RESERVED0));
	h->arch = snapfmt_get_le16(b + SNAPFMT_HDR_OFF_ARCH);
	if (!arch_ok(h->arch))
		return fail(d, SNAPFMT_ERR_BADARCH, -1, "arch", SNAPFMT_HDR_OFF_ARCH,
			    "architecture %u unknown (1 = x86_64, 2 = aarch64)", h->arch);
	h->page_size = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_PAGE_SIZE);
	if (!page_size_ok(h->page_size))
		return fail(d, SNAPFMT_ERR_BADHEADER, -1, "page_size", SNAPFMT_HDR_OFF_PAGE_SIZE,
			    "page_size %u not 4096, 16384 or 65536", h->page_size);
	h->flags = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_FLAGS);
	unknown = h->flags & SNAPFMT_HDR_F_REQUIRED_MASK & ~SNAPFMT_HDR_F_KNOWN_REQUIRED;
	if (unknown)
		return fail(d, SNAPFMT_ERR_BADFLAGS, -1, "flags", SNAPFMT_HDR_OFF_FLAGS,
			    "unknown must-understand flags 0x%x", unknown);
	h->file_size = snapfmt_get_le64(b + SNAPFMT_HDR_OFF_FILE_SIZE);
	if (h->file_size > n)
		return fail(d, SNAPFMT_ERR_TRUNCATED, -1, "file_size", n,
			    "file_size %llu but the input has only %llu bytes",
			    (unsigned long long)h->file_size, (unsigned long long)n);
	if (h->file_size < n)
		return fail(d, SNAPFMT_ERR_BADHEADER, -1, "file_size", h->file_size,
			    "%llu trailing bytes after file_size %llu",
			    (unsigned long long)(n - h->file_size), (unsigned long long)h->file_size);
	h->section_count = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_SECTION_COUNT);
	if (h->section_count > SNAPFMT_MAX_SECTIONS)
		return fail(d, SNAPFMT_ERR_LIMIT, -1, "section_count", SNAPFMT_HDR_OFF_SECTION_COUNT,
			    "section_count %u > limit %u", h->section_count, SNAPFMT_MAX_SECTIONS);
	if (snapfmt_get_le32(b + SNAPFMT_HDR_OFF_TABLE_ENTRY_SIZE) != SNAPFMT_TABLE_ENTRY_SIZE)
		return fail(d, SNAPFMT_ERR_BADHEADER, -1, "table_entry_size",
			    SNAPFMT_HDR_OFF_TABLE_ENTRY_SIZE, "table_entry_size %u != %u",
			    snapfmt_get_le32(b + SNAPFMT_HDR_OFF_TABLE_ENTRY_SIZE),
			    SNAPFMT_TABLE_ENTRY_SIZE);
	h->table_offset = snapfmt_get_le64(b + SNAPFMT_HDR_OFF_TABLE_OFFSET);
	if (!is_aligned(h->table_offset, SNAPFMT_SECTION_ALIGN))
		return fail(d, SNAPFMT_ERR_BADALIGN, -1, "table_offset", SNAPFMT_HDR_OFF_TABLE_OFFSET,
			    "table_offset %llu not 8-aligned", (unsigned long long)h->table_offset);
	tlen = (uint64_t)h->section_count * SNAPFMT_TABLE_ENTRY_SIZE;
	if (!range_inside(h->table_offset, tlen, h->header_len, h->file_size))
		return fail(d, SNAPFMT_ERR_BADOFFSET, -1, "table_offset", SNAPFMT_HDR_OFF_TABLE_OFFSET,
			    "section table [%llu, +%llu) not inside [%u, %llu)",
			    (unsigned long long)h->table_offset, (unsigned long long)tlen,
			    h->header_len, (unsigned long long)h->file_size);
	h->table_crc32c = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_TABLE_CRC32C);
	crc = snapfmt_crc32c(0, b + h->table_offset, tlen);
	if (crc != h->table_crc32c)
		return fail(d, SNAPFMT_ERR_BADCRC, -1, "table_crc32c", h->table_offset,
			    "table CRC32C 0x%08x != stored 0x%08x", crc, h->table_crc32c);
	return 0;
}

#define CMP3(x, y) ((x) < (y) ? -1 : (x) > (y) ? 1 : 0)

static int cmp_key(const struct snapfmt_reader *r, uint32_t a, uint32_t b)
{
	const uint8_t *ea = entry(r, a), *eb = entry(r, b);
	int c = CMP3(ENT32(ea, TYPE), ENT32(eb, TYPE));

	if (!c)
		c = CMP3(ENT32(ea, INSTANCE), ENT32(eb, INSTANCE));
	return c ? c : CMP3(a, b);
}

static int cmp_off(const struct snapfmt_reader *r, uint32_t a, uint32_t b)
{
	int c = CMP3(ENT64(entry(r, a), OFFSET), ENT64(entry(r, b), OFFSET));

	return c ? c : CMP3(a, b);
}

/* Heapsort of index arrays (no recursion, no allocation, no qsort_r),
 * specialised per comparator; skipped when the input is already in order
 * (canonical files are sorted by offset). */
#define DEFINE_SORT(name, cmp)								\
static void name##_sift(const struct snapfmt_reader *r, uint32_t *v, size_t root, size_t n) \
{											\
	for (;;) {									\
		size_t c = 2 * root + 1;						\
		uint32_t t;								\
		if (c >= n)								\
			return;								\
		if (c + 1 < n && cmp(r, v[c], v[c + 1]) < 0)				\
			c++;								\
		if (cmp(r, v[root], v[c]) >= 0)						\
			return;								\
		t = v[root], v[root] = v[c], v[c] = t;					\
		root = c;								\
	}										\
}											\
static void name(const struct snapfmt_reader *r, uint32_t *v, size_t n)		\
{											\
	size_t i;									\
	for (i = 1; i < n && cmp(r, v[i - 1], v[i]) < 0; i++)				\
		;									\
	if (i >= n)									\
		return;									\
	for (i = n / 2; i-- > 0;)							\
		name##_sift(r, v, i, n);						\
	for (size_t end = n; end-- > 1;) {						\
		uint32_t t = v[0];							\
		v[0] = v[end], v[end] = t;						\
		name##_sift(r, v, 0, end);						\
	}										\
}
DEFINE_SORT(sort_by_key, cmp_key)
DEFINE_SORT(sort_by_off, cmp_off)

/* The little-endian uint of `width` bytes at off; false when [off, off+width)
 * is not inside the section (a rule reads only what a MIN step proved, so
 * that is a generator bug, reported as BADLENGTH rather than read). */
static bool rule_field(const uint8_t *data, uint64_t len, uint32_t off, uint32_t width,
		       uint64_t *v)
{
	if (!range_inside(off, width, 0, len))
		return false;
	switch (width) {
	case 1: *v = data[off]; return true;
	case 2: *v = snapfmt_get_le16(data + off); return true;
	case 4: *v = snapfmt_get_le32(data + off); return true;
	case 8: *v = snapfmt_get_le64(data + off); return true;
	default: return false;
	}
}

/* sum += roundup(count * elem, align) without overflow; false if the sum
 * would pass UINT64_MAX (then no section length can match it: sections are
 * at most 1 GiB). */
static bool sum_add(uint64_t *sum, uint64_t count, uint64_t elem, uint64_t align)
{
	uint64_t t;

	if (elem && count > UINT64_MAX / elem)
		return false;
	t = count * elem;
	if (align > 1) {
		if (t > UINT64_MAX - (align - 1))
			return false;
		t = (t + align - 1) & ~(align - 1);
	}
	if (t > UINT64_MAX - *sum)
		return false;
	*sum += t;
	return true;
}

/* STRTAB step (rows[0] STRTAB, rows[1..n] STR_ARRAY); the exact-length step
 * before it proved every record and the table inside the section, but every
 * access is still range-checked. */
static int rule_strtab(const struct rule_row *rows, const uint8_t *data, uint64_t len)
{
	uint64_t pos = rows[0].a, run = 0, slen;

	if (!rule_field(data, len, rows[0].off, rows[0].width, &slen))
		return SNAPFMT_ERR_BADLENGTH;
	for (uint64_t j = 1; j <= rows[0].b; j++) {
		const struct rule_row *ar = &rows[j];
		uint64_t cnt, so, sl;

		if (!rule_field(data, len, ar->off, ar->width, &cnt) || pos > len ||
		    (ar->a && cnt > (len - pos) / ar->a))
			return SNAPFMT_ERR_BADLENGTH;
		if (ar->b != SNAPFMT_RULE_STR_NONE) {
			for (uint64_t i = 0; i < cnt; i++) {
				uint64_t rec = pos + i * ar->a;

				if (!range_inside(rec, ar->a, 0, len) || ar->b + 4 > ar->a ||
				    ar->c + 4 > ar->a)
					return SNAPFMT_ERR_BADLENGTH;
				so = snapfmt_get_le32(data + rec + ar->b);
				sl = snapfmt_get_le32(data + rec + ar->c);
				if (so != run)
					return SNAPFMT_ERR_BADOFFSET;
				run += sl;   /* <= 2^32 * records (< 2^24): no overflow */
			}
		}
		pos += cnt * ar->a;
	}
	if (run != slen)
		return SNAPFMT_ERR_BADLENGTH;
	if (!range_inside(pos, slen, 0, len))
		return SNAPFMT_ERR_BADLENGTH;
	for (uint64_t i = pos + slen; i < len; i++)
		if (data[i])
			return SNAPFMT_ERR_BADVALUE;
	return 0;
}

/* A kind's length rule over one section: 0, BADLENGTH, LIMIT, BADVALUE or
 * BADOFFSET, the first failing step in declaration order. */
static int check_rule(const struct kind_desc *k, const uint8_t *data, uint64_t len)
{
	const struct rule_row *rows = rule_rows + k->rule_first;
	uint64_t sum = 0, v;
	bool sum_ok = true;
	int err;

	for (uint32_t i = 0; i < k->rule_count; i++) {
		const struct rule_row *r = &rows[i];

		switch (r->op) {
		case SNAPFMT_RULE_MIN:
			if (len < r->a)
				return SNAPFMT_ERR_BADLENGTH;
			break;
		case SNAPFMT_RULE_MAX:
			if (len > r->a)
				return SNAPFMT_ERR_BADLENGTH;
			break;
		case SNAPFMT_RULE_MULTIPLE:
			if (!r->a || len % r->a)
				return SNAPFMT_ERR_BADLENGTH;
			break;
		case SNAPFMT_RULE_LIMIT:
		case SNAPFMT_RULE_VALUE_MAX:
			if (!rule_field(data, len, r->off, r->width, &v))
				return SNAPFMT_ERR_BADLENGTH;
			if (v > r->a)
				return r->op == SNAPFMT_RULE_LIMIT ? SNAPFMT_ERR_LIMIT
								   : SNAPFMT_ERR_BADVALUE;
			break;
		case SNAPFMT_RULE_VALUE_IN:
			if (!rule_field(data, len, r->off, r->width, &v))
				return SNAPFMT_ERR_BADLENGTH;
			if (v != r->a && v != r->b && v != r->c)
				return SNAPFMT_ERR_BADVALUE;
			break;
		case SNAPFMT_RULE_SUM_BASE:
			sum = r->a, sum_ok = true;
			break;
		case SNAPFMT_RULE_SUM_ADD:
			if (!rule_field(data, len, r->off, r->width, &v))
				return SNAPFMT_ERR_BADLENGTH;
			sum_ok = sum_ok && sum_add(&sum, v, r->a, r->b);
			break;
		case SNAPFMT_RULE_LEN_EQ_SUM:
			if (!sum_ok || len != sum)
				return SNAPFMT_ERR_BADLENGTH;
			break;
		case SNAPFMT_RULE_LEN_GE_SUM:
			if (!sum_ok || len < sum)
				return SNAPFMT_ERR_BADLENGTH;
			break;
		case SNAPFMT_RULE_STRTAB:
			if (r->b > k->rule_count - i - 1)
				return SNAPFMT_ERR_BADLENGTH;
			if ((err = rule_strtab(r, data, len)))
				return err;
			i += (uint32_t)r->b;
			break;
		default:
			return SNAPFMT_ERR_BADLENGTH;
		}
	}
	return 0;
}

/* Rule 20 for a known, non-BULK section (at open: the rule only for kinds
 * Python checks at open; on demand: always). */
static int check_length(const struct kind_desc *k, const uint8_t *data, uint64_t len,
			bool at_open)
{
	if (k->shape == SNAPFMT_SHAPE_FIXED && len != k->fixed_size)
		return SNAPFMT_ERR_BADLENGTH;
	if (k->rule_count && (k->rule_at_open || !at_open))
		return check_rule(k, data, len);
	return 0;
}

int snapfmt_section_check(const struct snapfmt_section *sec)
{
	const struct kind_desc *k;

	if (!sec || (!sec->data && sec->length))
		return SNAPFMT_ERR_INVAL;
	k = kind_lookup(sec->type);
	if (!k || sec->version > k->version || (sec->flags & SNAPFMT_SEC_F_BULK))
		return 0;
	return check_length(k, sec->data, sec->length, false);
}

/* Rules 16-20 (and the deep BULK CRC with SNAPFMT_OPEN_DEEP). */
static int check_table(struct snapfmt_reader *r, unsigned flags, struct snapfmt_diag *d)
{
	const struct snapfmt_info *h = &r->info;
	uint64_t tlen = (uint64_t)r->count * SNAPFMT_TABLE_ENTRY_SIZE;
	uint32_t *by_off = r->idx + r->count;
	int64_t dup = -1;
	int err;

	for (uint32_t i = 0; i < r->count; i++) {
		const uint8_t *e = entry(r, i);
		uint64_t eoff = h->table_offset + (uint64_t)i * SNAPFMT_TABLE_ENTRY_SIZE;
		uint16_t f = ENT16(e, FLAGS);
		uint64_t off = ENT64(e, OFFSET), len = ENT64(e, LENGTH);
		bool bulk = f & SNAPFMT_SEC_F_BULK;

		if (f & ~SNAPFMT_SEC_F_KNOWN)
			return fail(d, SNAPFMT_ERR_BADFLAGS, (int)i, "flags", eoff + SNAPFMT_ENT_OFF_FLAGS,
				    "unknown section flags 0x%x", f & ~SNAPFMT_SEC_F_KNOWN);
		if (!is_aligned(off, SNAPFMT_SECTION_ALIGN) || (bulk && !is_aligned(off, h->page_size)))
			return fail(d, SNAPFMT_ERR_BADALIGN, (int)i, "offset",
				    eoff + SNAPFMT_ENT_OFF_OFFSET, "%ssection offset %llu not %u-aligned",
				    bulk ? "BULK " : "", (unsigned long long)off,
				    bulk ? h->page_size : SNAPFMT_SECTION_ALIGN);
		if (bulk && !is_aligned(len, h->page_size))
			return fail(d, SNAPFMT_ERR_BADALIGN, (int)i, "length",
				    eoff + SNAPFMT_ENT_OFF_LENGTH,
				    "BULK section length %llu not a multiple of page_size %u",
				    (unsigned long long)len, h->page_size);
		if (!range_inside(off, len, h->header_len, h->file_size))
			return fail(d, SNAPFMT_ERR_BADOFFSET, (int)i, "offset",
				    eoff + SNAPFMT_ENT_OFF_OFFSET,
				    "section [%llu, +%llu) not inside [%u, %llu)",
				    (unsigned long long)off, (unsigned long long)len, h->header_len,
				    (unsigned long long)h->file_size);
		if (ranges_overlap(off, len, h->table_offset, tlen))
			return fail(d, SNAPFMT_ERR_BADOFFSET, (int)i, "offset",
				    eoff + SNAPFMT_ENT_OFF_OFFSET,
				    "section [%llu, %llu) overlaps the table [%llu, %llu)",
				    (unsigned long long)off, (unsigned long long)(off + len),
				    (unsigned long long)h->table_offset,
				    (unsigned long long)(h->table_offset + tlen));
		if (!bulk && len > SNAPFMT_MAX_STATE_SECTION_LEN)
			return fail(d, SNAPFMT_ERR_LIMIT, (int)i, "length", eoff + SNAPFMT_ENT_OFF_LENGTH,
				    "section length %llu > limit %llu", (unsigned long long)len,
				    (unsigned long long)SNAPFMT_MAX_STATE_SECTION_LEN);
		r->by_key[i] = by_off[i] = i;
	}

	/* rule 17: duplicates (first later entry in table order), then overlaps */
	sort_by_key(r, r->by_key, r->count);
	for (uint32_t j = 1; j < r->count; j++) {
		const uint8_t *a = entry(r, r->by_key[j - 1]), *b = entry(r, r->by_key[j]);

		if (ENT32(a, TYPE) == ENT32(b, TYPE) && ENT32(a, INSTANCE) == ENT32(b, INSTANCE) &&
		    (dup < 0 || r->by_key[j] < dup))
			dup = r->by_key[j];
	}
	if (dup >= 0) {
		const uint8_t *e = entry(r, (uint32_t)dup);

		return fail(d, SNAPFMT_ERR_DUPLICATE, (int)dup, "type",
			    h->table_offset + (uint64_t)dup * SNAPFMT_TABLE_ENTRY_SIZE,
			    "(type 0x%x, instance %u) appears twice", ENT32(e, TYPE), ENT32(e, INSTANCE));
	}
	sort_by_off(r, by_off, r->count);
	for (uint32_t j = 1; j < r->count; j++) {
		const uint8_t *a = entry(r, by_off[j - 1]), *b = entry(r, by_off[j]);
		uint64_t ao = ENT64(a, OFFSET), al = ENT64(a, LENGTH), bo = ENT64(b, OFFSET);

		if (bo < ao + al)
			return fail(d, SNAPFMT_ERR_OVERLAP, (int)by_off[j], "offset",
				    h->table_offset + (uint64_t)by_off[j] * SNAPFMT_TABLE_ENTRY_SIZE +
				    SNAPFMT_ENT_OFF_OFFSET,
				    "[%llu, %llu) overlaps table[%u] [%llu, %llu)",
				    (unsigned long long)bo,
				    (unsigned long long)(bo + ENT64(b, LENGTH)), by_off[j - 1],
				    (unsigned long long)ao, (unsigned long long)(ao + al));
	}

	/* rules 18-20, per section in table order */
	for (uint32_t i = 0; i < r->count; i++) {
		struct snapfmt_section s;
		const struct kind_desc *k;

		snapfmt_section_at(r, i, &s);
		k = kind_lookup(s.type);
		if (!k || s.version > k->version) {
			if (s.flags & SNAPFMT_SEC_F_CRITICAL)
				return fail(d, SNAPFMT_ERR_UNKNOWN_CRITICAL, (int)i, "type", s.offset,
					    k ? "CRITICAL section: version %u newer than supported %u"
					      : "CRITICAL section: type 0x%08x unknown",
					    k ? s.version : s.type, k ? k->version : 0);
			k = NULL;   /* ancillary, not understood: CRC only, then skipped */
		}
		if (s.flags & SNAPFMT_SEC_F_BULK)
			continue;
		if (!snapfmt_section_crc_ok(&s))
			return fail(d, SNAPFMT_ERR_BADCRC, (int)i, "crc32c", s.offset,
				    "table[%u] (type 0x%x, instance %u): CRC32C 0x%08x != table "
				    "value 0x%08x", i, s.type, s.instance,
				    snapfmt_crc32c(0, s.data, s.length), s.crc);
		if (!k)
			continue;
		err = check_length(k, s.data, s.length, true);
		if (err)
			return fail(d, err, (int)i, "length", s.offset,
				    "%s[%u]: %s (length %llu; %s)", k->name, s.instance,
				    snapfmt_strerror(err), (unsigned long long)s.length,
				    k->shape == SNAPFMT_SHAPE_FIXED
					    ? "fixed size" : "see its length rule in spec/tables.md");
	}
	if (flags & SNAPFMT_OPEN_DEEP) {
		uint32_t bad;

		err = snapfmt_verify_bulk(r, &bad);
		if (err)
			return fail(d, err, (int)bad, "crc32c", ENT64(entry(r, bad), OFFSET),
				    "BULK section table[%u]: CRC32C mismatch", bad);
	}
	return 0;
}

static int open_common(const uint8_t *base, uint64_t size, int fd, void *map, unsigned flags,
		       struct snapfmt_reader **out, struct snapfmt_diag *d)
{
	struct snapfmt_info info;
	struct snapfmt_reader *r;
	int err;

	err = check_header(base, size, &info, d);
	if (err)
		return err;
	r = calloc(1, sizeof(*r) + 2 * sizeof(uint32_t) * (size_t)info.section_count);
	if (!r)
		return fail(d, SNAPFMT_ERR_NOMEM, -1, NULL, 0, "cannot allocate the reader");
	r->base = base;
	r->size = size;
	r->fd = fd;
	r->map = map;
	r->info = info;
	r->table = base + info.table_offset;
	r->count = info.section_count;
	r->by_key = r->idx;
	err = check_table(r, flags, d);
	if (err) {
		free(r);
		return err;
	}
	*out = r;
	return 0;
}

int snapfmt_open_buffer_diag(const void *buf, size_t len, unsigned flags,
			     struct snapfmt_reader **out, struct snapfmt_diag *diag)
{
	static const uint8_t empty[1];

	if (diag)
		memset(diag, 0, sizeof(*diag));
	if (!out || (!buf && len) || (flags & ~SNAPFMT_OPEN_DEEP))
		return fail(diag, SNAPFMT_ERR_INVAL, -1, NULL, 0, "invalid argument");
	*out = NULL;
	return open_common(buf ? buf : empty, len, -1, NULL, flags, out, diag);
}

int snapfmt_open_buffer(const void *buf, size_t len, unsigned flags, struct snapfmt_reader **out)
{
	return snapfmt_open_buffer_diag(buf, len, flags, out, NULL);
}

int snapfmt_open_diag(const char *path, unsigned flags, struct snapfmt_reader **out,
		      struct snapfmt_diag *diag)
{
	static const uint8_t empty[1];
	struct stat st;
	void *map = NULL;
	int fd, err, saved;

	if (diag)
		memset(diag, 0, sizeof(*diag));
	if (!path || !out || (flags & ~SNAPFMT_OPEN_DEEP))
		return fail(diag, SNAPFMT_ERR_INVAL, -1, NULL, 0, "invalid argument");
	*out = NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return fail(diag, SNAPFMT_ERR_IO, -1, NULL, 0, "cannot open %s: %s", path,
			    strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		saved = S_ISREG(st.st_mode) ? errno : EINVAL;
		close(fd);
		errno = saved;
		return fail(diag, SNAPFMT_ERR_IO, -1, NULL, 0, "%s: not a readable regular file", path);
	}
	if (st.st_size > 0) {
		map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
		if (map == MAP_FAILED) {
			saved = errno;
			close(fd);
			errno = saved;
			return fail(diag, SNAPFMT_ERR_IO, -1, NULL, 0, "cannot mmap %s: %s", path,
				    strerror(saved));
		}
	}
	err = open_common(map ? map : empty, (uint64_t)st.st_size, fd, map, flags, out, diag);
	if (err) {
		if (map)
			munmap(map, (size_t)st.st_size);
		close(fd);
	}
	return err;
}

int snapfmt_open(const char *path, unsigned flags, struct snapfmt_reader **out)
{
	return snapfmt_open_diag(path, flags, out, NULL);
}

void snapfmt_close(struct snapfmt_reader *r)
{
	if (!r)
		return;
	if (r->map)
		munmap(r->map, (size_t)r->size);
	if (r->fd >= 0)
		close(r->fd);
	free(r);
}

void snapfmt_get_info(const struct snapfmt_reader *r, struct snapfmt_info *info)
{
	*info = r->info;
}

int snapfmt_reader_fd(const struct snapfmt_reader *r)
{
	return r ? r->fd : -1;
}

uint32_t snapfmt_section_count(const struct snapfmt_reader *r)
{
	return r->count;
}

int snapfmt_section_at(const struct snapfmt_reader *r, uint32_t i, struct snapfmt_section *s)
{
	const uint8_t *e;

	if (i >= r->count)
		return SNAPFMT_ERR_NOTFOUND;
	e = entry(r, i);
	s->index = i;
	s->type = ENT32(e, TYPE);
	s->instance = ENT32(e, INSTANCE);
	s->version = ENT16(e, VERSION);
	s->flags = ENT16(e, FLAGS);
	s->crc = ENT32(e, CRC32C);
	s->offset = ENT64(e, OFFSET);
	s->length = ENT64(e, LENGTH);
	s->data = r->base + s->offset;   /* rule 16 proved [offset, +length) inside */
	return 0;
}

int snapfmt_find(const struct snapfmt_reader *r, uint32_t type, uint32_t instance,
		 struct snapfmt_section *sec)
{
	size_t lo = 0, hi = r->count;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		const uint8_t *e = entry(r, r->by_key[mid]);
		int c = CMP3(ENT32(e, TYPE), type);

		if (!c)
			c = CMP3(ENT32(e, INSTANCE), instance);
		if (!c)
			return snapfmt_section_at(r, r->by_key[mid], sec);
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return SNAPFMT_ERR_NOTFOUND;
}

int snapfmt_section_crc_ok(const struct snapfmt_section *s)
{
	return snapfmt_crc32c(0, s->data, s->length) == s->crc;
}

int snapfmt_verify_bulk(const struct snapfmt_reader *r, uint32_t *bad_index)
{
	for (uint32_t i = 0; i < r->count; i++) {
		struct snapfmt_section s;

		snapfmt_section_at(r, i, &s);
		if ((s.flags & SNAPFMT_SEC_F_BULK) && !snapfmt_section_crc_ok(&s)) {
			if (bad_index)
				*bad_index = i;
			return SNAPFMT_ERR_BADCRC;
		}
	}
	return 0;
}

int snapfmt_map_ram(const struct snapfmt_reader *r, uint32_t instance, void *addr_hint, int prot,
		    void **out, uint64_t *len_out)
{
	struct snapfmt_section s;
	void *p;
	int err;

	if (!r || !out)
		return SNAPFMT_ERR_INVAL;
	*out = NULL;
	if (r->fd < 0)
		return SNAPFMT_ERR_INVAL;
	err = snapfmt_find(r, SNAPFMT_SEC_RAM, instance, &s);
	if (err)
		return err;
	if (!(s.flags & SNAPFMT_SEC_F_BULK) || s.length == 0 ||
	    (uint64_t)(size_t)s.length != s.length)
		return SNAPFMT_ERR_INVAL;
	p = mmap(addr_hint, (size_t)s.length, prot, MAP_PRIVATE, r->fd, (off_t)s.offset);
	if (p == MAP_FAILED)
		return SNAPFMT_ERR_IO;
	*out = p;
	if (len_out)
		*len_out = s.length;
	return 0;
}

/* ---- writer ----------------------------------------------------------------- */

struct wentry {
	uint32_t type, instance;
	uint16_t version, flags;
	uint32_t crc;
	uint64_t offset, length;
};

struct snapfmt_writer {
	int fd;
	uint16_t arch;
	uint32_t page_size, flags;
	int failed;              /* sticky error after a failed write */
	uint64_t pos;            /* end of the last section */
	struct wentry *ent;
	uint32_t count, cap;
	uint64_t *keys;          /* open-addressing set of (type, instance) + 1 */
	uint32_t key_cap;
	uint32_t zero_op[32];    /* CRC operator: append page_size zero bytes */
	uint8_t *bounce;         /* fd input buffer */
	char *path, *tmp;
};

#define BOUNCE_SIZE (1u << 20)

static int pwrite_all(int fd, const void *buf, uint64_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len > (1u << 30) ? (1u << 30) : (size_t)len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return SNAPFMT_ERR_IO;
		p += n, off += (uint64_t)n, len -= (uint64_t)n;
	}
	return 0;
}

int snapfmt_writer_create(const char *path, uint16_t arch, uint32_t page_size, uint32_t flags,
			  struct snapfmt_writer **out)
{
	struct snapfmt_writer *w;
	const char *slash;
	size_t dlen;

	if (!path || !*path || !out)
		return SNAPFMT_ERR_INVAL;
	*out = NULL;
	if (!arch_ok(arch))
		return SNAPFMT_ERR_BADARCH;
	if (!page_size_ok(page_size))
		return SNAPFMT_ERR_INVAL;
	if (flags & SNAPFMT_HDR_F_REQUIRED_MASK & ~SNAPFMT_HDR_F_KNOWN_REQUIRED)
		return SNAPFMT_ERR_BADFLAGS;
	w = calloc(1, sizeof(*w));
	if (!w)
		return SNAPFMT_ERR_NOMEM;
	w->fd = -1;
	w->arch = arch;
	w->page_size = page_size;
	w->flags = flags;
	w->pos = SNAPFMT_HEADER_SIZE;
	snapfmt_crc32c_zeros_op(w->zero_op, page_size);
	slash = strrchr(path, '/');
	dlen = slash ? (size_t)(slash - path) + 1 : 0;
	w->path = strdup(path);
	w->tmp = malloc(strlen(path) + 16);
	if (!w->path || !w->tmp) {
		snapfmt_writer_abort(w);
		return SNAPFMT_ERR_NOMEM;
	}
	/* "<dir>/.<name>.XXXXXX.tmp"; mkstemps opens with O_CREAT|O_EXCL */
	sprintf(w->tmp, "%.*s.%s.XXXXXX.tmp", (int)dlen, path, path + dlen);
	w->fd = mkostemps(w->tmp, 4, O_CLOEXEC);
	if (w->fd < 0) {
		int saved = errno;

		free(w->tmp);
		w->tmp = NULL;
		snapfmt_writer_abort(w);
		errno = saved;
		return SNAPFMT_ERR_IO;
	}
	*out = w;
	return 0;
}

static uint64_t key_hash(uint64_t k, uint32_t cap)
{
	return (k * 0x9E3779B97F4A7C15ull) >> 32 & (cap - 1);
}

/* Insert (type, instance); 1 if it was already present, <0 on ENOMEM. */
static int key_insert(struct snapfmt_writer *w, uint32_t type, uint32_t instance)
{
	uint64_t k = ((uint64_t)type << 32 | instance) + 1;   /* 0 = empty slot */
	uint64_t h;

	if ((uint64_t)(w->count + 1) * 2 > w->key_cap) {
		uint32_t ncap = w->key_cap ? w->key_cap * 2 : 64;
		uint64_t *nk = calloc(ncap, sizeof(*nk));

		if (!nk)
			return SNAPFMT_ERR_NOMEM;
		for (uint32_t i = 0; i < w->key_cap; i++) {
			if (!w->keys[i])
				continue;
			for (h = key_hash(w->keys[i], ncap); nk[h]; h = (h + 1) & (ncap - 1))
				;
			nk[h] = w->keys[i];
		}
		free(w->keys);
		w->keys = nk;
		w->key_cap = ncap;
	}
	for (h = key_hash(k, w->key_cap); w->keys[h]; h = (h + 1) & (w->key_cap - 1))
		if (w->keys[h] == k)
			return 1;
	w->keys[h] = k;
	return 0;
}

static bool all_zero(const uint8_t *p, size_t n)
{
	uint64_t acc = 0, v;
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		memcpy(&v, p + i, 8);
		acc |= v;
		if (acc && !(i & 511))
			return false;
	}
	for (; i < n; i++)
		acc |= p[i];
	return acc == 0;
}

/* Write pages [p, p+len) at file offset off: zero pages stay holes, the CRC
 * of a zero page is an operator application, not a byte loop. */
static int write_pages(struct snapfmt_writer *w, const uint8_t *p, uint64_t len, uint64_t off,
		       uint32_t *crc)
{
	uint64_t run = 0;   /* pending non-zero bytes ending at p + i */
	int err;

	for (uint64_t i = 0; i < len; i += w->page_size) {
		if (all_zero(p + i, w->page_size)) {
			if (run && (err = pwrite_all(w->fd, p + i - run, run, off + i - run)))
				return err;
			run = 0;
			*crc = snapfmt_crc32c_zeros_apply(*crc, w->zero_op);
		} else {
			*crc = snapfmt_crc32c(*crc, p + i, w->page_size);
			run += w->page_size;
		}
	}
	return run ? pwrite_all(w->fd, p + len - run, run, off + len - run) : 0;
}

/* BULK data from an fd: holes found with SEEK_DATA are never read. */
static int write_pages_fd(struct snapfmt_writer *w, int fd, uint64_t src, uint64_t len,
			  uint64_t off, uint32_t *crc)
{
	uint64_t done = 0;
	int err;

	if (!w->bounce && !(w->bounce = malloc(BOUNCE_SIZE)))
		return SNAPFMT_ERR_NOMEM;
	while (done < len) {
		off_t data = lseek(fd, (off_t)(src + done), SEEK_DATA);
		uint64_t chunk, hole = 0;

		if (data < 0 && errno == ENXIO)
			hole = len - done;                  /* only a hole up to EOF */
		else if (data > (off_t)(src + done))
			hole = (uint64_t)data - (src + done);
		hole -= hole % w->page_size;
		if (hole > len - done)
			hole = len - done;
		for (; hole; hole -= w->page_size, done += w->page_size)
			*crc = snapfmt_crc32c_zeros_apply(*crc, w->zero_op);
		if (done >= len)
			break;
		chunk = len - done < BOUNCE_SIZE ? len - done : BOUNCE_SIZE;
		for (uint64_t got = 0; got < chunk;) {
			ssize_t n = pread(fd, w->bounce + got, (size_t)(chunk - got),
					  (off_t)(src + done + got));

			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return SNAPFMT_ERR_IO;
			if (n == 0) {   /* past EOF of the source: zeros */
				memset(w->bounce + got, 0, (size_t)(chunk - got));
				break;
			}
			got += (uint64_t)n;
		}
		err = write_pages(w, w->bounce, chunk, off + done, crc);
		if (err)
			return err;
		done += chunk;
	}
	return 0;
}

static int writer_add(struct snapfmt_writer *w, uint32_t type, uint32_t instance, uint16_t flags,
		      uint16_t version, const void *buf, int fd, uint64_t fd_off, uint64_t len)
{
	bool bulk = flags & SNAPFMT_SEC_F_BULK;
	struct wentry *e;
	uint64_t off;
	uint32_t crc = 0;
	int err;

	if (!w)
		return SNAPFMT_ERR_INVAL;
	if (w->failed)
		return w->failed;
	if (flags & ~SNAPFMT_SEC_F_KNOWN)
		return SNAPFMT_ERR_BADFLAGS;
	if (!buf && fd < 0 && len)
		return SNAPFMT_ERR_INVAL;
	if (w->count >= SNAPFMT_MAX_SECTIONS)
		return SNAPFMT_ERR_LIMIT;
	if (!bulk && len > SNAPFMT_MAX_STATE_SECTION_LEN)
		return SNAPFMT_ERR_LIMIT;
	if (bulk && !is_aligned(len, w->page_size))
		return SNAPFMT_ERR_BADALIGN;
	off = align_up(w->pos, bulk ? w->page_size : SNAPFMT_SECTION_ALIGN);
	if (len > SNAPFMT_MAX_FILE_SIZE - off)
		return SNAPFMT_ERR_LIMIT;
	if (w->count == w->cap) {
		uint32_t ncap = w->cap ? w->cap * 2 : 16;
		struct wentry *ne = realloc(w->ent, ncap * sizeof(*ne));

		if (!ne)
			return SNAPFMT_ERR_NOMEM;
		w->ent = ne, w->cap = ncap;
	}
	err = key_insert(w, type, instance);
	if (err)
		return err > 0 ? SNAPFMT_ERR_DUPLICATE : err;
	if (!bulk)
		err = pwrite_all(w->fd, buf, len, off), crc = snapfmt_crc32c(0, buf, len);
	else if (buf)
		err = write_pages(w, buf, len, off, &crc);
	else
		err = write_pages_fd(w, fd, fd_off, len, off, &crc);
	if (err) {
		w->failed = err;
		return err;
	}
	e = &w->ent[w->count++];
	*e = (struct wentry){ type, instance, version, flags, crc, off, len };
	w->pos = off + len;
	return 0;
}

int snapfmt_writer_add(struct snapfmt_writer *w, uint32_t type, uint32_t instance, uint16_t flags,
		       uint16_t version, const void *buf, uint64_t len)
{
	return writer_add(w, type, instance, flags, version, buf, -1, 0, len);
}

int snapfmt_writer_add_ram(struct snapfmt_writer *w, uint32_t instance, const void *ptr, int fd,
			   uint64_t fd_offset, uint64_t len)
{
	const struct kind_desc *k = kind_lookup(SNAPFMT_SEC_RAM);

	if (!ptr && fd < 0)
		return SNAPFMT_ERR_INVAL;
	return writer_add(w, SNAPFMT_SEC_RAM, instance, k->default_flags | SNAPFMT_SEC_F_BULK,
			  k->version, ptr, fd, fd_offset, len);
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)v), put16(p + 2, (uint16_t)(v >> 16));
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32));
}

static void writer_free(struct snapfmt_writer *w)
{
	if (w->fd >= 0)
		close(w->fd);
	free(w->ent);
	free(w->keys);
	free(w->bounce);
	free(w->path);
	free(w->tmp);
	free(w);
}

int snapfmt_writer_commit(struct snapfmt_writer *w)
{
	uint8_t hdr[SNAPFMT_HEADER_SIZE] = { 0 };
	uint64_t table_off, tlen, file_size;
	uint8_t *table;
	int err = 0, dfd, saved;
	char *slash;

	if (!w)
		return SNAPFMT_ERR_INVAL;
	if (w->failed) {
		err = w->failed;
		goto out_abort;
	}
	table_off = align_up(w->pos, SNAPFMT_SECTION_ALIGN);
	tlen = (uint64_t)w->count * SNAPFMT_TABLE_ENTRY_SIZE;
	file_size = table_off + tlen;
	table = calloc(1, tlen ? tlen : 1);
	if (!table) {
		err = SNAPFMT_ERR_NOMEM;
		goto out_abort;
	}
	for (uint32_t i = 0; i < w->count; i++) {
		uint8_t *e = table + (uint64_t)i * SNAPFMT_TABLE_ENTRY_SIZE;
		const struct wentry *s = &w->ent[i];

		put32(e + SNAPFMT_ENT_OFF_TYPE, s->type);
		put32(e + SNAPFMT_ENT_OFF_INSTANCE, s->instance);
		put16(e + SNAPFMT_ENT_OFF_VERSION, s->version);
		put16(e + SNAPFMT_ENT_OFF_FLAGS, s->flags);
		put32(e + SNAPFMT_ENT_OFF_CRC32C, s->crc);
		put64(e + SNAPFMT_ENT_OFF_OFFSET, s->offset);
		put64(e + SNAPFMT_ENT_OFF_LENGTH, s->length);
	}
	memcpy(hdr, SNAPFMT_MAGIC, SNAPFMT_MAGIC_LEN);
	put32(hdr + SNAPFMT_HDR_OFF_HEADER_LEN, SNAPFMT_HEADER_SIZE);
	put16(hdr + SNAPFMT_HDR_OFF_VERSION_MAJOR, SNAPFMT_VERSION_MAJOR);
	put16(hdr + SNAPFMT_HDR_OFF_VERSION_MINOR, SNAPFMT_VERSION_MINOR);
	put16(hdr + SNAPFMT_HDR_OFF_COMPAT_MAJOR, SNAPFMT_COMPAT_VERSION_MAJOR);
	put16(hdr + SNAPFMT_HDR_OFF_COMPAT_MINOR, SNAPFMT_COMPAT_VERSION_MINOR);
	put16(hdr + SNAPFMT_HDR_OFF_ARCH, w->arch);
	put32(hdr + SNAPFMT_HDR_OFF_PAGE_SIZE, w->page_size);
	put32(hdr + SNAPFMT_HDR_OFF_FLAGS, w->flags);
	put32(hdr + SNAPFMT_HDR_OFF_SECTION_COUNT, w->count);
	put32(hdr + SNAPFMT_HDR_OFF_TABLE_ENTRY_SIZE, SNAPFMT_TABLE_ENTRY_SIZE);
	put64(hdr + SNAPFMT_HDR_OFF_TABLE_OFFSET, table_off);
	put64(hdr + SNAPFMT_HDR_OFF_FILE_SIZE, file_size);
	put32(hdr + SNAPFMT_HDR_OFF_TABLE_CRC32C, snapfmt_crc32c(0, table, tlen));
	put32(hdr + SNAPFMT_HDR_OFF_HEADER_CRC32C, snapfmt_crc32c(0, hdr, sizeof(hdr)));

	if (ftruncate(w->fd, (off_t)file_size) < 0 ||
	    (err = pwrite_all(w->fd, table, tlen, table_off)) ||
	    (err = pwrite_all(w->fd, hdr, sizeof(hdr), 0)) || fsync(w->fd) < 0) {
		err = SNAPFMT_ERR_IO;
		free(table);
		goto out_abort;
	}
	free(table);
	if (rename(w->tmp, w->path) < 0) {
		err = SNAPFMT_ERR_IO;
		goto out_abort;
	}
	/* the rename is durable once the directory is synced */
	slash = strrchr(w->path, '/');
	if (slash)
		slash[slash == w->path ? 1 : 0] = '\0';
	dfd = open(slash ? w->path : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0 || fsync(dfd) < 0)
		err = SNAPFMT_ERR_IO;
	saved = errno;
	if (dfd >= 0)
		close(dfd);
	writer_free(w);
	errno = saved;
	return err;

out_abort:
	saved = errno;
	snapfmt_writer_abort(w);
	errno = saved;
	return err;
}

void snapfmt_writer_abort(struct snapfmt_writer *w)
{
	if (!w)
		return;
	if (w->tmp && w->fd >= 0)
		unlink(w->tmp);
	writer_free(w);
}
