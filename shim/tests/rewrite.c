/* SPDX-License-Identifier: MIT */
/* rewrite IN OUT -- read IN with the C reader, write every section in table
 * order through the C writer.  For a canonical IN, OUT is byte-identical. */
#include <stdio.h>

#include "snapfmt.h"

int main(int argc, char **argv)
{
	struct snapfmt_reader *r;
	struct snapfmt_writer *w;
	struct snapfmt_info h;
	int err;

	if (argc != 3) {
		fprintf(stderr, "usage: rewrite IN OUT\n");
		return 1;
	}
	err = snapfmt_open(argv[1], SNAPFMT_OPEN_DEEP, &r);
	if (err) {
		fprintf(stderr, "rewrite: %s: %s\n", argv[1], snapfmt_strerror(err));
		return 2;
	}
	snapfmt_get_info(r, &h);
	err = snapfmt_writer_create(argv[2], h.arch, h.page_size, h.flags, &w);
	for (uint32_t i = 0; !err && i < snapfmt_section_count(r); i++) {
		struct snapfmt_section s;

		snapfmt_section_at(r, i, &s);
		err = snapfmt_writer_add(w, s.type, s.instance, s.flags, s.version, s.data, s.length);
		if (err)
			snapfmt_writer_abort(w);
	}
	if (!err)
		err = snapfmt_writer_commit(w);
	snapfmt_close(r);
	if (err) {
		fprintf(stderr, "rewrite: %s: %s\n", argv[2], snapfmt_strerror(err));
		return 2;
	}
	return 0;
}
