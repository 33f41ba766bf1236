/* SPDX-License-Identifier: MIT */
/* CRC32C: known vectors, SSE4.2 vs table on random data, zero-run operator. */
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"
#include "tap.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next(void)
{
	rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
	return rng;
}

int main(void)
{
	static const char v[] = "123456789";
	enum { N = 1 << 17 };
	uint8_t *buf = malloc(N + 64), *zeros = calloc(1, 65536);
	uint32_t op[32];

	CHECK_EQ(snapfmt_crc32c_sw(0, v, 9), 0xE3069283u);
	CHECK_EQ(snapfmt_crc32c_hw(0, v, 9), 0xE3069283u);
	CHECK_EQ(snapfmt_crc32c(0, v, 9), 0xE3069283u);
	CHECK_EQ(snapfmt_crc32c(0, "", 0), 0);
	/* chaining == one shot */
	CHECK_EQ(snapfmt_crc32c(snapfmt_crc32c(0, v, 4), v + 4, 5), 0xE3069283u);
	printf("# sse4.2 %s\n", snapfmt_crc32c_hw_available() ? "used" : "not available");

	for (size_t i = 0; i < N + 64; i++)
		buf[i] = (uint8_t)next();
	for (int t = 0; t < 2000; t++) {
		size_t off = next() % 64, len = next() % (t < 1000 ? 300 : N);
		uint32_t seed = (uint32_t)next();

		if (snapfmt_crc32c_sw(seed, buf + off, len) != snapfmt_crc32c_hw(seed, buf + off, len)) {
			CHECK(!"sw != hw");
			break;
		}
	}
	CHECK(1);

	for (uint64_t n = 1; n <= 65536; n <<= 1) {
		uint32_t seed = (uint32_t)next();

		snapfmt_crc32c_zeros_op(op, n);
		CHECK_EQ(snapfmt_crc32c_zeros_apply(seed, op), snapfmt_crc32c_sw(seed, zeros, n));
	}
	free(buf);
	free(zeros);
	return tap_done("test_crc32c");
}
