/* SPDX-License-Identifier: MIT */
/* Unit tests of the non-KVM parts of snapfmt_kvm.c (run under ASan+UBSan by
 * `make check`): memory_layout bytes (vs the Python declaration), RAM from a
 * sparse memfd, metadata, seal + snapfmt_kvm_open, the immutability rules
 * (writable mode, mtime after sealing, memfd seals) and restore_ram refusing
 * a reader it cannot check.  No /dev/kvm needed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "snapfmt_kvm.h"
#include "tap.h"

/* snapfmt.registry.by_name("memory_layout").encode() of regions
   [(gpa 0, 2 MiB, instance 0), (gpa 4 GiB, 4 KiB, instance 1)] */
static const char LAYOUT_HEX[] =
	"0200000000000000"
	"0000000000000000" "0000200000000000" "00000000" "00000000" "00000000" "00000000"
	"0000000000000000" "0000000000000000" "0000000000000000" "0000000000000000"
	"0000000000000000000000000000000000000000000000000000000000000000"
	"0000000001000000" "0010000000000000" "00000000" "00000000" "01000000" "00000000"
	"0000000000000000" "0000000000000000" "0000000000000000" "0000000000000000"
	"0000000000000000000000000000000000000000000000000000000000000000";

static char dir[] = "/tmp/snapfmt_test_kvm.XXXXXX";

static int hexval(char c)
{
	return c <= '9' ? c - '0' : c - 'a' + 10;
}

/* memfd with 2 MiB + 4 KiB, a few non-zero pages */
static int make_ram(void)
{
	int fd = memfd_create("t", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	uint8_t page[4096];

	if (fd < 0 || ftruncate(fd, (2 << 20) + 4096) < 0)
		return -1;
	memset(page, 0xab, sizeof(page));
	if (pwrite(fd, page, sizeof(page), 4096 * 3) != 4096 ||
	    pwrite(fd, page, sizeof(page), 2 << 20) != 4096)
		return -1;
	return fd;
}

static int write_snap(const char *path, int ramfd, int meta)
{
	struct snapfmt_writer *w;
	struct snapfmt_kvm_ram regs[2] = {{.gpa = 0, .size = 2 << 20},
					   {.gpa = 1ull << 32, .size = 4096}};
	uint64_t offs[2] = {0, 2 << 20};
	const char *kv[] = {"vcpus", "1", "memory_mib", "2"};
	int err = snapfmt_writer_create(path, SNAPFMT_ARCH_X86_64, 4096, 0, &w);

	if (err)
		return err;
	if (meta && (err = snapfmt_kvm_save_metadata(w, "test_kvm", "1", kv, 2, NULL))) {
		snapfmt_writer_abort(w);
		return err;
	}
	if ((err = snapfmt_kvm_save_ram(w, ramfd, offs, regs, 2))) {
		snapfmt_writer_abort(w);
		return err;
	}
	return snapfmt_writer_commit(w);
}

static void test_layout_and_ram(int ramfd)
{
	char path[256];
	struct snapfmt_reader *r = NULL;
	struct snapfmt_section s;
	struct stat st;

	snprintf(path, sizeof(path), "%s/a.snap", dir);
	CHECK_EQ(write_snap(path, ramfd, 1), 0);
	CHECK_EQ(snapfmt_open(path, SNAPFMT_OPEN_DEEP, &r), 0);
	if (!r)
		return;
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_MEMORY_LAYOUT, 0, &s), 0);
	CHECK_EQ(s.length, (sizeof(LAYOUT_HEX) - 1) / 2);
	int same = s.length == (sizeof(LAYOUT_HEX) - 1) / 2;
	for (uint64_t i = 0; same && i < s.length; i++)
		same = ((const uint8_t *)s.data)[i] ==
		       (hexval(LAYOUT_HEX[2 * i]) << 4 | hexval(LAYOUT_HEX[2 * i + 1]));
	CHECK(same);
	CHECK_EQ(s.flags, SNAPFMT_SEC_F_CRITICAL);
	/* metadata first (ancillary), then layout, then RAM */
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_METADATA, 0, &s), 0);
	CHECK_EQ(s.index, 0);
	CHECK_EQ(s.flags, 0);
	CHECK(snapfmt_get_le64(s.data) > 1600000000ull * 1000000000ull);
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_RAM, 0, &s), 0);
	CHECK_EQ(s.length, 2 << 20);
	CHECK_EQ(((const uint8_t *)s.data)[4096 * 3], 0xab);
	CHECK_EQ(((const uint8_t *)s.data)[4096 * 4], 0);
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_RAM, 1, &s), 0);
	CHECK_EQ(s.length, 4096);
	snapfmt_close(r);
	/* zero pages are holes: 2 data pages on disk (plus header/table) */
	CHECK_EQ(stat(path, &st), 0);
	CHECK(st.st_blocks * 512 < 64 * 1024);

	/* not opened through snapfmt_kvm_open: restore_ram refuses */
	struct snapfmt_kvm_ram out[4];
	uint32_t n = 99;
	CHECK_EQ(snapfmt_open(path, 0, &r), 0);
	CHECK_EQ(snapfmt_kvm_restore_ram(r, -1, 0, out, 4, &n), SNAPFMT_ERR_CHANGED);
	CHECK_EQ(n, 0);
	CHECK(strstr(snapfmt_kvm_last_error(), "snapfmt_kvm_open") != NULL);
	snapfmt_close(r);

	/* writable file: refused at open */
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, NULL), SNAPFMT_ERR_CHANGED);
	CHECK(r == NULL);
	CHECK(strstr(snapfmt_kvm_last_error(), "writable") != NULL);
	/* sealed: accepted, and mtime == metadata created_unix_ns */
	CHECK_EQ(snapfmt_kvm_seal(path), 0);
	CHECK_EQ(stat(path, &st), 0);
	CHECK_EQ(st.st_mode & 0777, 0444);
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, NULL), 0);
	CHECK(r != NULL);
	/* a KVM call on a bad vm fd after the checks: maps then fails in the
	   ioctl, leaving nothing mapped */
	CHECK_EQ(snapfmt_kvm_restore_ram(r, -1, 0, out, 4, &n), SNAPFMT_ERR_KVM);
	CHECK(strcmp(snapfmt_kvm_last_ioctl(), "KVM_SET_USER_MEMORY_REGION") == 0);
	CHECK_EQ(snapfmt_kvm_restore_ram(r, -1, 0, out, 1, &n), SNAPFMT_ERR_LIMIT);
	/* made writable after the open: the per-child re-check refuses */
	CHECK_EQ(chmod(path, 0644), 0);
	CHECK_EQ(snapfmt_kvm_restore_ram(r, -1, 0, out, 4, &n), SNAPFMT_ERR_CHANGED);
	CHECK_EQ(chmod(path, 0444), 0);
	/* ctime moved: still refused for this reader (changed since opened) */
	CHECK_EQ(snapfmt_kvm_restore_ram(r, -1, 0, out, 4, &n), SNAPFMT_ERR_CHANGED);
	snapfmt_kvm_close(r);
	/* a new open after chmod back is fine (mtime still sealed) */
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, NULL), 0);
	snapfmt_kvm_close(r);
	/* modified in place (mtime moves): refused even when read-only again */
	CHECK_EQ(chmod(path, 0644), 0);
	int fd = open(path, O_WRONLY);
	CHECK(fd >= 0);
	uint8_t zero = 0;
	struct snapfmt_info info;
	CHECK_EQ(snapfmt_open(path, 0, &r), 0);
	snapfmt_get_info(r, &info);
	CHECK_EQ(snapfmt_find(r, SNAPFMT_SEC_RAM, 0, &s), 0);
	uint64_t ram_off = s.offset;
	snapfmt_close(r);
	CHECK_EQ(pwrite(fd, &zero, 1, (off_t)ram_off + 4096 * 3), 1);
	close(fd);
	CHECK_EQ(chmod(path, 0444), 0);
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, NULL), SNAPFMT_ERR_CHANGED);
	CHECK(strstr(snapfmt_kvm_last_error(), "modified after it was sealed") != NULL);
	unlink(path);

	/* no metadata: only the mode rule applies */
	snprintf(path, sizeof(path), "%s/b.snap", dir);
	CHECK_EQ(write_snap(path, ramfd, 0), 0);
	CHECK_EQ(snapfmt_kvm_seal(path), 0);
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, NULL), 0);
	snapfmt_kvm_close(r);
	unlink(path);
	/* corrupt snapshot: the reader's error and message come through */
	snprintf(path, sizeof(path), "%s/c.snap", dir);
	fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0444);
	CHECK(fd >= 0);
	CHECK_EQ(write(fd, "SNAPFMT", 7), 7);
	close(fd);
	struct snapfmt_diag d;
	CHECK_EQ(snapfmt_kvm_open(path, 0, &r, &d), SNAPFMT_ERR_TRUNCATED);
	CHECK(strstr(snapfmt_kvm_last_error(), "c.snap") != NULL);
	unlink(path);
}

static void test_memfd_seals(void)
{
	int fd = memfd_create("s", MFD_CLOEXEC | MFD_ALLOW_SEALING);

	CHECK(fd >= 0);
	CHECK_EQ(ftruncate(fd, 4096), 0);
	CHECK_EQ(snapfmt_kvm_check_immutable(fd), SNAPFMT_ERR_CHANGED);
	CHECK(strstr(snapfmt_kvm_last_error(), "F_SEAL_WRITE") != NULL);
	CHECK_EQ(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
	CHECK_EQ(snapfmt_kvm_check_immutable(fd), SNAPFMT_ERR_CHANGED);
	CHECK_EQ(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), 0);
	CHECK_EQ(snapfmt_kvm_check_immutable(fd), 0);
	close(fd);
	/* memfd without MFD_ALLOW_SEALING can never be sealed: mode rule (0777) */
	fd = memfd_create("u", MFD_CLOEXEC);
	CHECK(fd >= 0);
	CHECK_EQ(snapfmt_kvm_check_immutable(fd), SNAPFMT_ERR_CHANGED);
	close(fd);
	CHECK_EQ(snapfmt_kvm_check_immutable(-1), SNAPFMT_ERR_IO);
}

static void test_args(void)
{
	uint32_t n;

	CHECK_EQ(snapfmt_kvm_msr_list(-1, NULL, 0, &n), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_kvm_msr_list(-1, &n, 1, &n), SNAPFMT_ERR_KVM);
	CHECK(strcmp(snapfmt_kvm_last_ioctl(), "KVM_GET_MSR_INDEX_LIST") == 0);
	CHECK_EQ(snapfmt_kvm_pause_vcpu(-1, NULL), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_kvm_save_vm(NULL, -1), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_kvm_restore_vm(NULL, -1), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_kvm_restore_vcpu(NULL, -1, 0), SNAPFMT_ERR_INVAL);
	CHECK_EQ(snapfmt_kvm_seal(NULL), SNAPFMT_ERR_INVAL);
}

int main(void)
{
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	int ramfd = make_ram();
	CHECK(ramfd >= 0);
	if (ramfd >= 0) {
		test_layout_and_ram(ramfd);
		close(ramfd);
	}
	test_memfd_seals();
	test_args();
	rmdir(dir);
	return tap_done("test_kvm");
}
