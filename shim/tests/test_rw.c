/* SPDX-License-Identifier: MIT */
/* Writer -> reader round trips, sparse RAM, map_ram, abort, API errors,
 * truncation and bit flips of a valid image (run under ASan+UBSan). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "snapfmt.h"
#include "tap.h"

static char dir[] = "/tmp/snapfmt-test-XXXXXX";

static char *path(const char *name)
{
	static char p[4][256];
	static int k;

	k = (k + 1) % 4;
	snprintf(p[k], sizeof(p[k]), "%s/%s", dir, name);
	return p[k];
}

static int count_dir_entries(void)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	while ((e = readdir(d)))
		n += e->d_name[0] != '.' || (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."));
	closedir(d);
	return n;
}

static uint8_t *read_file(const char *p, size_t *len)
{
	struct stat st;
	int fd = open(p, O_RDONLY);
	uint8_t *b;

	fstat(fd, &st);
	b = malloc((size_t)st.st_size + 1);
	*len = (size_t)pread(fd, b, (size_t)st.st_size, 0);
	close(fd);
	return b;
}

#define RAM_PAGES 64

static void test_roundtrip(void)
{
	struct snapfmt_writer *w;
	struct snapfmt_reader *r, *rb;
	struct snapfmt_section s;
	struct snapfmt_info info;
	uint8_t regs[144], *ram = calloc(RAM_PAGES, 4096), *buf;
	void *map;
	uint64_t mlen;
	size_t len;
	struct stat st;
	int fd;

	for (size_t i = 0; i < sizeof(regs); i++)
		regs[i] = (uint8_t)i;
	for (int p = 0; p < RAM_PAGES; p += 7)
		memset(ram + p * 4096, 0x40 + p, 4096);

	CHECK_EQ(snapfmt_writer_create(path("a.snap"), SNAPFMT_ARCH_X86_64, 4096, 0, &w), 0);
	CHECK_EQ(snapfmt_writer_add(w, SNAPFMT_SEC_X86_REGS, 0, SNAPFMT_SEC_F_CRITICAL, 1, regs,
				    sizeof(regs)), 0);
	CHECK_EQ(snapfmt_writer_add(w, SNAPFMT_SEC_X86_REGS, 0, SNAPFMT_SEC_F_CRITICAL, 1, regs,
				    sizeof(regs)), SNAPFMT_ERR_DUPLICATE);
	CHECK_EQ(snapfmt_writer_add(w, 0xF0000001u, 0, 0x4, 1, "x", 1), SNAPFMT_ERR_BADFLAGS);
	CHECK_EQ(snapfmt_writer_add(w, 0xF0000001u, 0, SNAPFMT_SEC_F_BULK, 1, ram, 100),
		 SNAPFMT_ERR_BADALIGN);
	CHECK_EQ(snapfmt_writer_add(w, 0xF0000002u, 7, 0, 3, "hello", 5), 0);
	CHECK_EQ(snapfmt_writer_add_ram(w, 0, ram, -1, 0, RAM_PAGES * 4096), 0);
	/* the same RAM from a sparse fd */
	fd = open(path("ram.img"), O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(fd >= 0);
	CHECK_EQ(ftruncate(fd, RAM_PAGES * 4096 + 4096), 0);
	for (int p = 0; p < RAM_PAGES; p += 7)
		CHECK_EQ(pwrite(fd, ram + p * 4096, 4096, 4096 + p * 4096), 4096);
	CHECK_EQ(snapfmt_writer_add_ram(w, 1, NULL, fd, 4096, RAM_PAGES * 4096), 0);
	CHECK_EQ(snapfmt_writer_add(w, SNAPFMT_SEC_X86_REGS, 1, SNAPFMT_SEC_F_CRITICAL, 1, regs,
				    sizeof(regs)), 0);
	close(fd);
	CHECK_EQ(snapfmt_writer_commit(w), 0);
	CHECK_EQ(count_dir_entries(), 2);   /* a.snap, ram.img: no temp file left */

	CHECK_EQ(stat(path("a.snap"), &st), 0);
	CHECK((uint64_t)st.st_blocks * 512 < (uint64_t)st.st_size);   /* holes */

	CHECK_EQ(snapfmt_open(path("a.snap"), SNAPFMT_OPEN_DEEP, &r), 0);
	snapfmt_get_info(r, &info);
	CHECK_EQ(info.section_count, 5);
	CHECK_EQ(info.file_size, (uint64_t)st.st_size);
	CHECK_EQ(snapfmt_section_count(r), 5);
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_X86_REGS, 1, &s), 0);
	CHECK_EQ(s.index, 4);
	CHECK(s.length == sizeof(regs) && !memcmp(s.data, regs, sizeof(regs)));
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_X86_REGS, 2, &s), SNAPFMT_ERR_NOTFOUND);
	CHECK_EQ(snapfmt_find(r, 0xF0000002u, 7, &s), 0);
	CHECK_EQ(s.version, 3);
	CHECK_EQ(snapfmt_section_at(r, 5, &s), SNAPFMT_ERR_NOTFOUND);
	CHECK_EQ(snapfmt_section_at(r, 1, &s), 0);
	CHECK_EQ(s.offset % 8, 0);
	CHECK_EQ(snapfmt_verify_bulk(r, NULL), 0);
	{
		struct snapfmt_section a, b;

		snapfmt_find(r, SNAPFMT_SEC_RAM, 0, &a);
		snapfmt_find(r, SNAPFMT_SEC_RAM, 1, &b);
		CHECK_EQ(a.crc, b.crc);
		CHECK_EQ(a.offset % 4096, 0);
		CHECK(!memcmp(a.data, ram, RAM_PAGES * 4096));
		CHECK_EQ(a.crc, snapfmt_crc32c(0, ram, RAM_PAGES * 4096));
	}
	CHECK_EQ(snapfmt_map_ram(r, 1, NULL, PROT_READ | PROT_WRITE, &map, &mlen), 0);
	CHECK(map && mlen == RAM_PAGES * 4096 && !memcmp(map, ram, RAM_PAGES * 4096));
	((uint8_t *)map)[0] ^= 1;   /* MAP_PRIVATE: the file does not change */
	munmap(map, mlen);
	CHECK_EQ(snapfmt_map_ram(r, 9, NULL, PROT_READ, &map, &mlen), SNAPFMT_ERR_NOTFOUND);
	CHECK_EQ(snapfmt_verify_bulk(r, NULL), 0);

	buf = read_file(path("a.snap"), &len);
	CHECK_EQ(snapfmt_open_buffer(buf, len, 0, &rb), 0);
	CHECK_EQ(snapfmt_section_count(rb), 5);
	CHECK_EQ(snapfmt_map_ram(rb, 0, NULL, PROT_READ, &map, &mlen), SNAPFMT_ERR_INVAL);
	snapfmt_close(rb);

	/* every truncation fails cleanly; TRUNCATED or BADHEADER-class codes only */
	for (size_t n = 0; n < len; n += (n < 256 ? 1 : 509)) {
		int err = snapfmt_open_buffer(buf, n, 0, &rb);

		if (err != SNAPFMT_ERR_TRUNCATED && err != SNAPFMT_ERR_BADHEADER) {
			CHECK_EQ(err, SNAPFMT_ERR_TRUNCATED);
			break;
		}
		CHECK(rb == NULL);
	}
	/* every single-bit flip in the header, the table and known state
	 * sections is caught (padding and unknown ancillary sections are not
	 * covered by any CRC; RAM only by the deep check) */
	{
		int missed = 0;

		for (size_t i = 0; i < len; i++) {
			int err;

			if (!(i < 64 || i >= info.table_offset || (i >= 64 && i < 64 + 144) ||
			      (i >= 4096 + 2 * RAM_PAGES * 4096)))
				continue;
			buf[i] ^= 0x10;
			err = snapfmt_open_buffer(buf, len, 0, &rb);
			buf[i] ^= 0x10;
			if (!err) {
				snapfmt_close(rb);
				missed++;
				fprintf(stderr, "flip at %zu not detected\n", i);
			}
		}
		CHECK_EQ(missed, 0);
		buf[info.table_offset - 1] ^= 1;   /* RAM: deep verify */
		CHECK_EQ(snapfmt_open_buffer(buf, len, SNAPFMT_OPEN_DEEP, &rb), SNAPFMT_ERR_BADCRC);
	}
	free(buf);
	snapfmt_close(r);
	free(ram);
}

static void test_abort_and_args(void)
{
	struct snapfmt_writer *w;
	struct snapfmt_reader *r;
	struct snapfmt_diag d;
	int before = count_dir_entries();

	CHECK_EQ(snapfmt_writer_create(path("b.snap"), SNAPFMT_ARCH_AARCH64, 16384, 0, &w), 0);
	CHECK_EQ(snapfmt_writer_add(w, 0xF0000003u, 0, 0, 1, "abc", 3), 0);
	CHECK_EQ(count_dir_entries(), before + 1);
	snapfmt_writer_abort(w);
	CHECK_EQ(count_dir_entries(), before);
	CHECK_EQ(snapfmt_writer_create(path("b.snap"), 3, 4096, 0, &w), SNAPFMT_ERR_BADARCH);
	CHECK_EQ(snapfmt_writer_create(path("b.snap"), 1, 8192, 0, &w), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_writer_create(path("b.snap"), 1, 4096, 0x4, &w), SNAPFMT_ERR_BADFLAGS);
	CHECK_EQ(snapfmt_writer_create(path("nodir/b.snap"), 1, 4096, 0, &w), SNAPFMT_ERR_IO);
	CHECK_EQ(count_dir_entries(), before);

	/* empty image: 64 bytes, table_offset 64 */
	CHECK_EQ(snapfmt_writer_create(path("e.snap"), 1, 4096, SNAPFMT_HDR_F_TEMPLATE | 0x10000, &w), 0);
	CHECK_EQ(snapfmt_writer_commit(w), 0);
	CHECK_EQ(snapfmt_open(path("e.snap"), 0, &r), 0);
	CHECK_EQ(snapfmt_section_count(r), 0);
	CHECK_EQ(snapfmt_find(r, 1, 0, &(struct snapfmt_section){ 0 }), SNAPFMT_ERR_NOTFOUND);
	snapfmt_close(r);

	CHECK_EQ(snapfmt_open_diag(path("missing.snap"), 0, &r, &d), SNAPFMT_ERR_IO);
	CHECK(r == NULL && d.code == SNAPFMT_ERR_IO);
	CHECK_EQ(snapfmt_open_diag(dir, 0, &r, &d), SNAPFMT_ERR_IO);
	CHECK_EQ(snapfmt_open_buffer_diag("SNAPFMT", 7, 0, &r, &d), SNAPFMT_ERR_TRUNCATED);
	CHECK(strstr(d.message, "64") != NULL);
	CHECK_EQ(snapfmt_open_buffer(NULL, 0, 0, &r), SNAPFMT_ERR_TRUNCATED);
	CHECK_EQ(snapfmt_open_buffer("x", 1, 0x80, &r), SNAPFMT_ERR_INVAL);
	for (int e = 0; e <= SNAPFMT_ERR_MAX + 1; e++)
		CHECK(snapfmt_strerror(-e) != NULL);
	CHECK(!strcmp(snapfmt_strerror(SNAPFMT_ERR_BADCRC), "CRC32C mismatch"));
	CHECK(!strcmp(snapfmt_type_name(SNAPFMT_SEC_RAM), "ram"));
	CHECK(snapfmt_type_name(0xF0000000u) == NULL);
}

int main(void)
{
	char cmd[300];

	if (!mkdtemp(dir))
		return 2;
	test_roundtrip();
	test_abort_and_args();
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd))
		return 2;
	return tap_done("test_rw");
}
