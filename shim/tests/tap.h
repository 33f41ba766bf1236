/* SPDX-License-Identifier: MIT */
/* Minimal test harness: CHECK() counts, the run ends with "N passed, N failed". */
#ifndef SNAPFMT_TAP_H
#define SNAPFMT_TAP_H
#include <stdio.h>

static int tap_pass, tap_fail;

#define CHECK(cond) do { \
	if (cond) { tap_pass++; } else { tap_fail++; \
		fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); } \
	} while (0)
#define CHECK_EQ(a, b) do { long long _a = (long long)(a), _b = (long long)(b); \
	if (_a == _b) { tap_pass++; } else { tap_fail++; \
		fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %lld, %s == %lld\n", \
			__FILE__, __LINE__, #a, _a, #b, _b); } } while (0)

static int tap_done(const char *name)
{
	printf("%s: %d passed, %d failed\n", name, tap_pass, tap_fail);
	return tap_fail ? 1 : 0;
}
#endif
