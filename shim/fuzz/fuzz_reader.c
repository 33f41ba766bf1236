/* SPDX-License-Identifier: MIT */
/* libFuzzer target: open any bytes as a snapshot, walk every section, look
 * each one up again, deep-verify.  Any crash, leak or sanitizer report fails. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "snapfmt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Make every CRC the input declares correct (where the declared ranges lie
 * inside the input), so mutations reach the checks behind the CRCs. */
static void fix_crcs(uint8_t *b, size_t n)
{
	uint64_t hlen, toff, cnt;

	if (n < SNAPFMT_HEADER_SIZE)
		return;
	hlen = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_HEADER_LEN);
	toff = snapfmt_get_le64(b + SNAPFMT_HDR_OFF_TABLE_OFFSET);
	cnt = snapfmt_get_le32(b + SNAPFMT_HDR_OFF_SECTION_COUNT);
	if (toff <= n && cnt <= (n - toff) / SNAPFMT_TABLE_ENTRY_SIZE) {
		for (uint64_t i = 0; i < cnt; i++) {
			uint8_t *e = b + toff + i * SNAPFMT_TABLE_ENTRY_SIZE;
			uint64_t off = snapfmt_get_le64(e + SNAPFMT_ENT_OFF_OFFSET);
			uint64_t len = snapfmt_get_le64(e + SNAPFMT_ENT_OFF_LENGTH);

			if (off <= n && len <= n - off)
				put32(e + SNAPFMT_ENT_OFF_CRC32C, snapfmt_crc32c(0, b + off, len));
		}
		put32(b + SNAPFMT_HDR_OFF_TABLE_CRC32C,
		      snapfmt_crc32c(0, b + toff, cnt * SNAPFMT_TABLE_ENTRY_SIZE));
	}
	if (hlen >= SNAPFMT_HEADER_SIZE && hlen <= n) {
		put32(b + SNAPFMT_HDR_OFF_HEADER_CRC32C, 0);
		put32(b + SNAPFMT_HDR_OFF_HEADER_CRC32C, snapfmt_crc32c(0, b, hlen));
	}
}

static void exercise(const uint8_t *data, size_t size)
{
	struct snapfmt_reader *r;
	struct snapfmt_diag d;
	uint32_t sum = 0;
	int err;

	err = snapfmt_open_buffer_diag(data, size, 0, &r, &d);
	if (err) {
		if (r != NULL || d.code != err || !snapfmt_strerror(err))
			abort();
		return;
	}
	for (uint32_t i = 0; i < snapfmt_section_count(r); i++) {
		struct snapfmt_section s, f;

		if (snapfmt_section_at(r, i, &s))
			abort();
		if (snapfmt_find(r, s.type, s.instance, &f) || f.index != i)
			abort();
		/* touch every byte the reader hands out */
		sum += snapfmt_crc32c(0, s.data, s.length) == s.crc;
		(void)snapfmt_type_name(s.type);
		/* the whole length rule on demand: opened sections whose kind the
		   reader checks at open must pass it again */
		err = snapfmt_section_check(&s);
		if (err && err != SNAPFMT_ERR_BADLENGTH && err != SNAPFMT_ERR_LIMIT &&
		    err != SNAPFMT_ERR_BADVALUE && err != SNAPFMT_ERR_BADOFFSET)
			abort();
		if (err && s.type != SNAPFMT_SEC_ARM64_HVF_VCPU)
			abort();
	}
	if (snapfmt_reader_fd(r) != -1)
		abort();
	(void)snapfmt_verify_bulk(r, NULL);
	if (snapfmt_map_ram(r, 0, NULL, 1, &(void *){ NULL }, NULL) != SNAPFMT_ERR_INVAL)
		abort();
	snapfmt_close(r);
	/* a successful open must also succeed deep or fail only with BADCRC */
	err = snapfmt_open_buffer(data, size, SNAPFMT_OPEN_DEEP, &r);
	if (err && err != SNAPFMT_ERR_BADCRC)
		abort();
	if (!err)
		snapfmt_close(r);
	(void)sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t *copy;

	exercise(data, size);
	copy = malloc(size ? size : 1);
	if (!copy)
		return 0;
	memcpy(copy, data, size);
	fix_crcs(copy, size);
	exercise(copy, size);
	free(copy);
	return 0;
}
