/* SPDX-License-Identifier: GPL-2.0 */
/* The cffi extension lb._native: libbpf, the generated skeletons, and our helpers
 * (declared in csrc/native.cdef for Python). */
#ifndef XDPLB_NATIVE_H
#define XDPLB_NATIVE_H

#include <stdint.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>

/* libbpf's messages while capture is on (log.c) */
void xdplb_log_capture(int on);
const char *xdplb_log_text(void);

/* the data path's MurmurHash3 over n words (bpf/flowhash.h) */
uint32_t xdplb_murmur3(const uint32_t *words, uint32_t n, uint32_t seed);
/* The connection-table slot hash of a struct flow_key (its ten 32-bit words). */
uint32_t xdplb_flow_slot_hash(const uint32_t *key_words);
/* The vip_index slot hash of a struct vip_key (its five 32-bit words), before masking. */
uint32_t xdplb_vip_slot_hash(const uint32_t *key_words);

/* weighted Maglev table (maglev.c) */
int xdplb_maglev_build(uint32_t ring_size, uint32_t n, const uint32_t *keys,
		       uint32_t key_words, const uint64_t *weights, const uint32_t *ids,
		       uint32_t *table);

#endif
