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

/* Room for one VIP lookup: the key it builds, then the entry it copies out of vip_index
 * (the key is not needed once found; one buffer keeps the callers' stacks as they were). */
union vip_buf {
	struct vip_key key;
	struct vip_meta meta;
};

/* A key's VIP from its vip_index slot: 1 (the entry copied over buf->key) when the slot
 * holds the key; 0 when the slot is empty (no VIP has the key); -1 when `vips` must say
 * (the slot holds another key, or user space was rewriting it: seq odd or changed across
 * the read, the same x86-64 load ordering argument as in flowtable.h). Copied, not
 * pointed to: the slot may be rewritten once read. */
static __always_inline int vip_index_read(union vip_buf *buf)
{
	__u32 slot = vip_slot_hash(&buf->key) & vip_index_mask;
	struct vip_slot *s = bpf_map_lookup_elem(&vip_index, &slot);
	const __u32 *a, *b = (const void *)&buf->key;
	__u32 m0 = 0, m1 = 0, m2 = 0, m3 = 0; /* the entry, in registers */
	__u32 seq, match, used;

	if (!s)
		return -1;
	seq = *(volatile const __u32 *)&s->seq;
	barrier();
	a = (const void *)&s->key;
	used = s->key.family != LB_AF_NONE;
	match = a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4];
	if (match) {
		m0 = s->meta.vip_id;
		m1 = s->meta.flags;
		m2 = s->meta.ring_size;
		m3 = s->meta.ring_id;
	}
	barrier();
	if ((seq & 1) || *(volatile const __u32 *)&s->seq != seq)
		return -1;
	if (!match)
		return used ? -1 : 0;
	buf->meta.vip_id = m0;
	buf->meta.flags = m1;
	buf->meta.ring_size = m2;
	buf->meta.ring_id = m3;
	return 1;
}

/* One key: vip_index, and `vips` only when the index cannot say. 1: the entry is in
 * buf->meta. */
static __always_inline int vip_find(union vip_buf *buf)
{
	int r = vip_index_read(buf);
	struct vip_meta *m;

	if (r >= 0)
		return r;
	m = bpf_map_lookup_elem(&vips, &buf->key);
	if (!m)
		return 0;
	buf->meta = *m;
	return 1;
}

/* A flow's VIP key: its destination address, port and protocol. */
static __always_inline void vip_key_of_flow(const struct flow_key *fk, struct vip_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	__builtin_memcpy(k->addr, fk->dst, 16);
	k->port = fk->dport;
	k->proto = fk->proto;
	k->family = fk->family;
}

/* The VIP a flow is for: its key exact first, then the same address with port 0 ("any
 * port"). Its entry, copied to buf->meta, or NULL. */
static __always_inline struct vip_meta *vip_of_flow(const struct flow_key *fk,
						    union vip_buf *buf)
{
	int found;

	vip_key_of_flow(fk, &buf->key);
	found = vip_find(buf);
	if (!found && buf->key.port) {
		buf->key.port = 0;
		found = vip_find(buf);
	}
	return found ? &buf->meta : NULL;
}

/* vip_of_flow from `vips` alone, the entry read in place: for a rare path whose stack
 * has no room for the copy (k: room for the key). */
static __always_inline struct vip_meta *vip_of_flow_slow(const struct flow_key *fk,
							 struct vip_key *k)
{
	struct vip_meta *m;

	vip_key_of_flow(fk, k);
	m = bpf_map_lookup_elem(&vips, k);
	if (!m && k->port) {
		k->port = 0;
		m = bpf_map_lookup_elem(&vips, k);
	}
	return m;
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
	struct ring_chunk16 *chunk16;
	struct ring_chunk *chunk;
	struct backend *be;
	void *ring;

	ring = bpf_map_lookup_elem(&rings, &vm->ring_id);
	if (!ring || !vm->ring_size)
		return NULL;
	slot = hash % vm->ring_size;
	/* a shift and a mask (the chunk sizes are powers of two); the mask bounds the index
	 * for the verifier, which also drops the branch ring_ids16 does not take */
	if (ring_ids16) {
		elem = slot / LB_RING_CHUNK16;
		chunk16 = bpf_map_lookup_elem(ring, &elem);
		if (!chunk16)
			return NULL;
		id = chunk16->id[slot & (LB_RING_CHUNK16 - 1)];
	} else {
		elem = slot / LB_RING_CHUNK;
		chunk = bpf_map_lookup_elem(ring, &elem);
		if (!chunk)
			return NULL;
		id = chunk->id[slot & (LB_RING_CHUNK - 1)];
	}
	if (!id)
		return NULL;
	be = backend_lookup(id);
	if (!be || be->family == LB_AF_NONE || be->vip_id != vid)
		return NULL;
	*backend_id = id;
	return be;
}

#endif
