/* SPDX-License-Identifier: GPL-2.0 */
/* Flow hash: MurmurHash3 (x86, 32-bit) over 32-bit words read in host order. Also
 * compiled into the user-space extension (csrc/), so lb/flowhash.py and the Maglev
 * build use this very code. */
#ifndef XDPLB_FLOWHASH_H
#define XDPLB_FLOWHASH_H

#include <linux/types.h>
#include "lb_consts.h"
#include "lb_structs.h"

#ifndef __always_inline /* user space without glibc's sys/cdefs.h */
#define __always_inline inline __attribute__((always_inline))
#endif

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 mm3_step(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51u;
	k = rotl32(k, 15);
	k *= 0x1b873593u;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

static __always_inline __u32 mm3_final(__u32 h, __u32 nbytes)
{
	h ^= nbytes;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* MurmurHash3 over n words: the generic form, for user space (the data path unrolls
 * flow_hash below instead). */
static inline __u32 murmur3_words(const __u32 *w, __u32 n, __u32 seed)
{
	__u32 h = seed;

	for (__u32 i = 0; i < n; i++)
		h = mm3_step(h, w[i]);
	return mm3_final(h, n * 4);
}

/* Words: src address (1 or 4), then for the 5-tuple the dst address, the two ports as
 * they lie in the packet, and the protocol. */
static __always_inline __u32 flow_hash(const struct flow_key *k, int v6, int src_only)
{
	__u32 h = FLOW_HASH_SEED;
	__u32 n;

	if (v6) {
		h = mm3_step(h, k->src[0]);
		h = mm3_step(h, k->src[1]);
		h = mm3_step(h, k->src[2]);
		h = mm3_step(h, k->src[3]);
		n = 4;
		if (!src_only) {
			h = mm3_step(h, k->dst[0]);
			h = mm3_step(h, k->dst[1]);
			h = mm3_step(h, k->dst[2]);
			h = mm3_step(h, k->dst[3]);
			n = 8;
		}
	} else {
		h = mm3_step(h, k->src[0]);
		n = 1;
		if (!src_only) {
			h = mm3_step(h, k->dst[0]);
			n = 2;
		}
	}
	if (!src_only) {
		h = mm3_step(h, (__u32)k->sport | ((__u32)k->dport << 16));
		h = mm3_step(h, k->proto);
		n += 2;
	}
	return mm3_final(h, n * 4);
}

/* Where a flow sits in the connection table (its bucket and its own slot there): the ten
 * key words folded by XOR, then MurmurHash3's finaliser. Cheaper than flow_hash for IPv6,
 * and the same whatever the VIP's hash mode, since the table is asked before the VIP. */
static __always_inline __u32 flow_slot_hash(const struct flow_key *k)
{
	const __u32 *w = (const void *)k;
	__u32 h = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ w[5] ^ w[6] ^ w[7] ^ w[8] ^ w[9];

	return mm3_final(h, sizeof(*k));
}

/* flow_slot_hash of a key given as the XOR of its five 64-bit words: the XOR of the ten
 * 32-bit words is that value's two halves XORed (in either byte order). Half the loads. */
static __always_inline __u32 flow_slot_hash_x64(__u64 x)
{
	return mm3_final((__u32)x ^ (__u32)(x >> 32), sizeof(struct flow_key));
}

/* Where a VIP key sits in vip_index (before masking): the address words folded by XOR,
 * the port/protocol/family word spread by a multiply, then MurmurHash3's finaliser. */
static __always_inline __u32 vip_slot_hash(const struct vip_key *k)
{
	const __u32 *w = (const void *)k;

	return mm3_final(w[0] ^ w[1] ^ w[2] ^ w[3] ^ (w[4] * PREFILTER_MULT), sizeof(*k));
}

/* Index into the 65536-bit VIP address prefilter. */
static __always_inline __u32 prefilter_index(__u32 folded_addr)
{
	return (folded_addr * PREFILTER_MULT) >> 16;
}

#endif
