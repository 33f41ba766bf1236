/* bench_shim FILE ITERS -- mean microseconds of snapfmt_open(DEEP) + close
 * (mmap, every check of the spec, every section CRC incl. BULK) and of
 * snapfmt_open_buffer(DEEP) on the file's bytes (no syscalls). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "snapfmt.h"

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
	struct snapfmt_reader *r;
	struct stat st;
	long iters = argc > 2 ? atol(argv[2]) : 1000;
	double t0, t_file, t_buf;
	char *buf;
	int fd;

	if (argc < 2 || stat(argv[1], &st))
		return 1;
	t0 = now_us();
	for (long i = 0; i < iters; i++) {
		if (snapfmt_open(argv[1], SNAPFMT_OPEN_DEEP, &r))
			return 2;
		snapfmt_close(r);
	}
	t_file = (now_us() - t0) / iters;
	buf = malloc((size_t)st.st_size);
	fd = open(argv[1], O_RDONLY);
	if (!buf || read(fd, buf, (size_t)st.st_size) != st.st_size)
		return 1;
	close(fd);
	t0 = now_us();
	for (long i = 0; i < iters; i++) {
		if (snapfmt_open_buffer(buf, (size_t)st.st_size, SNAPFMT_OPEN_DEEP, &r))
			return 2;
		snapfmt_close(r);
	}
	t_buf = (now_us() - t0) / iters;
	printf("%.3f %.3f\n", t_file, t_buf);
	free(buf);
	return 0;
}
