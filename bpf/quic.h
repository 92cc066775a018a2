/* SPDX-License-Identifier: GPL-2.0 */
/* QUIC short-header packets routed by connection ID (the plaintext layout of the IETF
 * QUIC-LB draft): a QUIC connection is named by its destination connection ID, not its
 * 5-tuple, so a client that migrates (new address or port) must still reach the backend
 * that issued the ID. Byte 0 of the ID is its first octet (top 3 bits: config id, 0b111:
 * not routable), bytes 1..len the server ID (big endian), the rest the server's nonce.
 *
 * Asked before the connection table, for UDP packets only: a migrated connection arrives
 * on a 5-tuple the table may remember for another backend. Long headers (handshake) and
 * IDs that name no usable backend go on as UDP flows (ring and connection table). */
#ifndef XDPLB_QUIC_H
#define XDPLB_QUIC_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "select.h"
#include "encap.h"
#include "flowhash.h"

#define QUIC_LONG_HEADER 0x80 /* first byte of a long-header packet */
#define QUIC_CONFIG_UNROUTABLE 7 /* config id (top 3 bits of the CID's first octet) */
#define QUIC_CACHE_BITS 10
_Static_assert(LB_QUIC_CACHE_SLOTS == 1 << QUIC_CACHE_BITS, "quic_cache index bits");

/* Index of a VIP (address folded to 32 bits, port as in the packet) in quic_filter, in
 * 0..65535. lb/quicmaps.py computes the same. */
static __always_inline __u32 quic_filter_index(__u32 folded_addr, __u16 port)
{
	return ((folded_addr ^ port) * PREFILTER_MULT) >> 16;
}

/* The four-bit set of server-ID lengths a QUIC VIP at this flow's destination may use;
 * 0: no QUIC VIP there. */
static __always_inline __u32 quic_sid_lens(const struct flow_key *fk)
{
	__u32 idx = quic_filter_index(fk->dst[0] ^ fk->dst[1] ^ fk->dst[2] ^ fk->dst[3],
				      fk->dport);
	__u32 word = idx >> 4;
	__u64 *bits = bpf_map_lookup_elem(&quic_filter, &word);

	return bits ? (*bits >> ((idx & 15) * 4)) & 0xF : 0;
}

/* A quic_servers key as the three 64-bit words it is compared as (written whole, read
 * whole: see flow_key_words). */
union quic_key_words {
	struct quic_server_key k;
	__u64 w[3];
};

/* Slot of a key in a CPU's quic_cache range: its words folded, multiplied by the golden
 * ratio, the top bits (a server's IDs differ in the high half of the last word). */
static __always_inline __u32 quic_cache_index(const union quic_key_words *kw)
{
	__u64 x = kw->w[0] ^ kw->w[1] ^ kw->w[2];

	return ((x ^ x >> 32) * 0x9E3779B97F4A7C15ull) >> (64 - QUIC_CACHE_BITS);
}

/* The quic_servers entry of this flow's VIP and server ID `sid` (sid_len bytes): from
 * this CPU's quic_cache when it holds the key in the current epoch, else from the map
 * (and then cached). The epoch is read before the map: an entry read before user space
 * changed the map is cached under the epoch it then bumps past. */
static __always_inline const struct quic_server *quic_server_of(const struct flow_key *fk,
								__u32 sid_len, __u32 sid)
{
	__u32 zero = 0, slot, ep, *epoch = bpf_map_lookup_elem(&quic_epoch, &zero);
	const __u64 *dst = (const __u64 *)fk->dst;
	struct quic_cache_slot *cs;
	struct quic_server *qs;
	union quic_key_words kw;
	__u64 *cw;

	kw.w[0] = dst[0];
	kw.w[1] = dst[1];
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	kw.w[2] = (__u64)fk->dport | (__u64)fk->family << 16 | (__u64)sid_len << 24 |
		  (__u64)sid << 32;
#else
	kw.w[2] = (__u64)fk->dport << 48 | (__u64)fk->family << 40 | (__u64)sid_len << 32 | sid;
#endif
	slot = bpf_get_smp_processor_id() * LB_QUIC_CACHE_SLOTS + quic_cache_index(&kw);
	cs = bpf_map_lookup_elem(&quic_cache, &slot);
	if (!cs || !epoch)
		return NULL;
	/* once, before quic_servers: read after the map, a bump between the two would
	 * cache an old entry under the new epoch */
	ep = *(volatile __u32 *)epoch;
	cw = (__u64 *)&cs->key;
	if (cs->epoch == ep && !((cw[0] ^ kw.w[0]) | (cw[1] ^ kw.w[1]) | (cw[2] ^ kw.w[2])))
		return &cs->val;
	qs = bpf_map_lookup_elem(&quic_servers, &kw.k);
	if (qs) {
		cw[0] = kw.w[0];
		cw[1] = kw.w[1];
		cw[2] = kw.w[2];
		cs->val = *qs;
		cs->epoch = ep;
	}
	return qs;
}

/* The backend server ID `sid` (sid_len bytes) names at this flow's VIP, if it may take
 * the packet: known, still of that VIP, active or draining, and the datagram holds a
 * whole connection ID (payload bytes `plen`; *cid_len: the VIP's CID length). */
static __always_inline struct backend *quic_server_backend(const struct flow_key *fk,
							   __u32 sid_len, __u32 sid,
							   __u32 plen, __u32 *cid_len)
{
	const struct quic_server *qs = quic_server_of(fk, sid_len, sid);
	struct backend *be;

	if (!qs || plen < 1 + (__u32)qs->cid_len)
		return NULL;
	*cid_len = qs->cid_len;
	be = backend_lookup(qs->backend_id);
	if (!be || be->vip_id != qs->vip_id || !qs->vip_id || !(be->flags & BE_F_FLOWS_STAY))
		return NULL;
	return be;
}

/* The hash of a CID-routed packet (GUE source port, IPv6 flow label): of its connection
 * ID's first 8 bytes (fewer when the ID is shorter), so it stays when the client
 * migrates; a multiplicative hash, whose high half is well mixed (the GUE port and the
 * flow label take its low bits from the high half of the product). The packet holds
 * 1 + cid_len bytes. */
static __always_inline __u32 quic_cid_hash(const __u8 *p, void *end, __u32 cid_len)
{
	__u64 w;

	if ((void *)(p + 9) > end)
		return cid_len; /* an ID shorter than 8 bytes in a tiny datagram */
	__builtin_memcpy(&w, p + 1, 8);
	if (cid_len < 8)
		w &= (1ull << (8 * cid_len)) - 1; /* little endian: the first cid_len bytes */
	return ((w ^ FLOW_HASH_SEED) * 0x9E3779B97F4A7C15ull) >> 32;
}

/* The backend the server ID of length n (bytes 1..n of the connection ID, after the
 * packet's first byte) names, if a QUIC VIP here uses that length (`lens`). */
static __always_inline struct backend *quic_at_len(const struct flow_key *fk, const __u8 *p,
						   void *end, __u32 n, __u32 lens, __u32 plen,
						   __u32 *cid_len)
{
	__u32 sid = 0, i;

	if (!(lens & (1u << (n - 1))) || (void *)(p + 2 + n) > end)
		return NULL;
	for (i = 0; i < n; i++)
		sid = sid << 8 | p[2 + i];
	return quic_server_backend(fk, n, sid, plen, cid_len);
}

/* For a UDP flow: the backend a QUIC short-header packet's connection ID names (and
 * *hash, see quic_cid_hash), or NULL (not QUIC, a long header, or not routable: counted
 * as a fallback when the VIP is a QUIC VIP). Server IDs are read at every length a QUIC
 * VIP at this address and port may use (normally one). */
static __always_inline struct backend *quic_backend(struct xdp_md *ctx, struct lb_global *g,
						    const struct flow_key *fk,
						    const struct encap_info *ei, __u32 *hash)
{
	__u32 lens = quic_sid_lens(fk), hlen, plen, cid_len = 0;
	void *end = (void *)(long)ctx->data_end;
	struct backend *be = NULL;
	struct vip_meta *vm;
	__u8 *p;

	if (!lens)
		return NULL;
	hlen = (ei->inner_v6 ? IPV6_HLEN : IPV4_HLEN) + UDP_HLEN;
	p = (void *)(long)ctx->data + ETH_HLEN + hlen;
	if ((void *)(p + 1) > end || ei->inner_len <= hlen || (p[0] & QUIC_LONG_HEADER))
		return NULL; /* no QUIC header, or a long one: balanced as UDP */
	plen = ei->inner_len - hlen;
	if ((void *)(p + 2) <= end && (p[1] >> 5) != QUIC_CONFIG_UNROUTABLE) {
		be = quic_at_len(fk, p, end, 1, lens, plen, &cid_len);
		if (!be)
			be = quic_at_len(fk, p, end, 2, lens, plen, &cid_len);
		if (!be)
			be = quic_at_len(fk, p, end, 3, lens, plen, &cid_len);
		if (!be)
			be = quic_at_len(fk, p, end, 4, lens, plen, &cid_len);
		if (be) {
			g->c[ST_QUIC_ROUTED_BY_CID]++;
			*hash = quic_cid_hash(p, end, cid_len);
			return be;
		}
	}
	/* the filter says a QUIC VIP may be here; count only if it is one */
	{
		union vip_buf vbuf;

		vm = vip_of_flow(fk, &vbuf);
		if (vm && (vm->flags & VIP_F_QUIC))
			g->c[ST_QUIC_FALLBACK]++;
	}
	return NULL;
}

#endif
