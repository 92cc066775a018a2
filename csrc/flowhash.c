// SPDX-License-Identifier: GPL-2.0
/* The data path's MurmurHash3, connection-table and VIP-index slot hashes, for lb/flowhash.py
 * (`xdplb explain`, the tests' predictions), Maglev and the table's user-space reads:
 * one copy, in bpf/flowhash.h. */
#include "native.h"
#include "flowhash.h"

uint32_t xdplb_murmur3(const uint32_t *words, uint32_t n, uint32_t seed)
{
	return murmur3_words(words, n, seed);
}

uint32_t xdplb_flow_slot_hash(const uint32_t *key_words)
{
	return flow_slot_hash((const struct flow_key *)key_words);
}

uint32_t xdplb_vip_slot_hash(const uint32_t *key_words)
{
	return vip_slot_hash((const struct vip_key *)key_words);
}
