/* SPDX-License-Identifier: MIT */
/*
 * snapdump FILE -- print what the C reader sees, as JSON.
 * Exit 0 for a valid file; 2 with "snapdump: <error>" and where on stderr
 * for a file the reader refuses; 1 for usage errors.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "snapfmt.h"

static const char *arch_name(unsigned a)
{
#define AN(id, nm) if (a == (id)) return nm;
	SNAPFMT_ARCH_NAMES(AN)
#undef AN
	return "unknown";
}

int main(int argc, char **argv)
{
	struct snapfmt_reader *r;
	struct snapfmt_diag d;
	struct snapfmt_info h;
	int err;

	if (argc != 2 || argv[1][0] == '-') {
		fprintf(stderr, "usage: snapdump FILE\n");
		return 1;
	}
	err = snapfmt_open_diag(argv[1], 0, &r, &d);
	if (err) {
		fprintf(stderr, "snapdump: %s: %s", argv[1], snapfmt_strerror(err));
		if (err == SNAPFMT_ERR_IO && errno)
			fprintf(stderr, " (%s)", strerror(errno));
		if (d.section >= 0)
			fprintf(stderr, " [table[%d]", d.section);
		else
			fprintf(stderr, " [header");
		fprintf(stderr, "%s%s at byte %" PRIu64 "]: %s\n", d.field ? "." : "",
			d.field ? d.field : "", d.offset, d.message);
		return 2;
	}
	snapfmt_get_info(r, &h);
	printf("{\n  \"header\": {\"header_len\": %u, \"version_major\": %u, \"version_minor\": %u, "
	       "\"compat_major\": %u, \"compat_minor\": %u, \"arch\": %u, \"arch_name\": \"%s\", "
	       "\"page_size\": %u, \"flags\": %u, \"section_count\": %u, \"table_offset\": %" PRIu64
	       ", \"file_size\": %" PRIu64 ", \"header_crc32c\": %u, \"table_crc32c\": %u},\n"
	       "  \"sections\": [",
	       h.header_len, h.version_major, h.version_minor, h.compat_major, h.compat_minor,
	       h.arch, arch_name(h.arch), h.page_size, h.flags, h.section_count, h.table_offset,
	       h.file_size, h.header_crc32c, h.table_crc32c);
	for (uint32_t i = 0; i < snapfmt_section_count(r); i++) {
		struct snapfmt_section s;
		const char *name;

		snapfmt_section_at(r, i, &s);
		name = snapfmt_type_name(s.type);
		printf("%s\n    {\"index\": %u, \"type\": %u, \"name\": ", i ? "," : "", i, s.type);
		if (name)
			printf("\"%s\"", name);
		else
			printf("\"unknown-0x%08x\"", s.type);
		printf(", \"instance\": %u, \"version\": %u, \"flags\": %u, \"offset\": %" PRIu64
		       ", \"length\": %" PRIu64 ", \"crc32c\": %u, \"crc_ok\": %s}",
		       s.instance, s.version, s.flags, s.offset, s.length, s.crc,
		       snapfmt_section_crc_ok(&s) ? "true" : "false");
	}
	printf("%s]\n}\n", snapfmt_section_count(r) ? "\n  " : "");
	snapfmt_close(r);
	return 0;
}
