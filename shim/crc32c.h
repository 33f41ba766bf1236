/* SPDX-License-Identifier: MIT */
/* crc32c.h -- internal CRC32C helpers of the snapfmt shim (not installed). */
#ifndef SNAPFMT_CRC32C_H
#define SNAPFMT_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* All functions take and return the *finished* CRC (zlib convention):
 * start with 0, chain by passing the previous result. */
uint32_t snapfmt_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t snapfmt_crc32c_sw(uint32_t crc, const void *buf, size_t len);
/* SSE4.2 path; falls back to the table when the CPU lacks it. */
uint32_t snapfmt_crc32c_hw(uint32_t crc, const void *buf, size_t len);
/* 1 when snapfmt_crc32c_hw really uses the instruction. */
int snapfmt_crc32c_hw_available(void);

/* Appending zero bytes is linear in the CRC register: op[] is the 32x32
 * GF(2) matrix (one column per bit) for appending n zero bytes, n a power
 * of two.  crc32c_zeros_apply(crc, op) == snapfmt_crc32c(crc, zeros, n). */
void snapfmt_crc32c_zeros_op(uint32_t op[32], uint64_t n_pow2);
uint32_t snapfmt_crc32c_zeros_apply(uint32_t crc, const uint32_t op[32]);

#endif
