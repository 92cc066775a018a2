/* SPDX-License-Identifier: GPL-2.0 */
/* Choosing where a packet goes: VIP lookup, connection table, Maglev ring. */
#ifndef XDPLB_SELECT_H
#define XDPLB_SELECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "flowhash.h"

static __always_inline int prefilter_hit(__u32 folded_addr)
{
	__u32 idx = prefilter_index(folded_addr);
	__u32 word = idx >> 6;
	__u64 *bits = bpf_map_lookup_elem(&prefilter, &word);

	return bits && ((*bits >> (idx & 63)) & 1);
}

/* Does any VIP use this address? Only asked on rare paths. */
static __always_inline int addr_is_vip(const __u32 *addr, __u8 family)
{
	struct addr_key k = {};

	k.addr[0] = addr[0];
	if (family == LB_AF_INET6) {
		k.addr[1] = addr[1];
		k.addr[2] = addr[2];
		k.addr[3] = addr[3];
	}
	k.family = family;
	return bpf_map_lookup_elem(&vip_addrs, &k) != NULL;
}

/* Exact (address, port, protocol) first, then the same address with port 0. */
static __always_inline struct vip_meta *vip_lookup(struct vip_key *k)
{
	struct vip_meta *m = bpf_map_lookup_elem(&vips, k);

	if (!m && k->port) {
		k->port = 0;
		m = bpf_map_lookup_elem(&vips, k);
	}
	return m;
}

/* The VIP a flow is for: its destination address, port and protocol. */
static __always_inline struct vip_meta *vip_of_flow(const struct flow_key *fk)
{
	struct vip_key vk = {};

	__builtin_memcpy(vk.addr, fk->dst, 16);
	vk.port = fk->dport;
	vk.proto = fk->proto;
	vk.family = fk->family;
	return vip_lookup(&vk);
}

/* This CPU's copy of backend `id` (the first member of its struct backend_slot). */
static __always_inline struct backend *backend_lookup(__u32 id)
{
	__u32 key;

	if (id >= backends_stride)
		return NULL;
	key = bpf_get_smp_processor_id() * backends_stride + id;
	return bpf_map_lookup_elem(&backends, &key);
}

/* The ring's backend for a new (or moved) flow, or NULL when the VIP has none usable. */
static __always_inline struct backend *ring_pick(const struct vip_meta *vm, __u32 hash,
						 __u32 *backend_id)
{
	__u32 vid = vm->vip_id, slot, elem, id;
	struct ring_chunk *chunk;
	struct backend *be;
	void *ring;

	ring = bpf_map_lookup_elem(&rings, &vm->ring_id);
	if (!ring || !vm->ring_size)
		return NULL;
	slot = hash % vm->ring_size;
	/* a shift and a mask (LB_RING_CHUNK is a power of two); the mask bounds the index
	 * for the verifier */
	elem = slot / LB_RING_CHUNK;
	chunk = bpf_map_lookup_elem(ring, &elem);
	if (!chunk)
		return NULL;
	id = chunk->id[slot & (LB_RING_CHUNK - 1)];
	if (!id)
		return NULL;
	be = backend_lookup(id);
	if (!be || be->family == LB_AF_NONE || be->vip_id != vid)
		return NULL;
	*backend_id = id;
	return be;
}

#endif
