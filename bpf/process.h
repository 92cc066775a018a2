/* SPDX-License-Identifier: GPL-2.0 */
/* Per-family packet handling: decide pass / drop / forward, then forward. */
#ifndef XDPLB_PROCESS_H
#define XDPLB_PROCESS_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_maps.h"
#include "parse.h"
#include "select.h"
#include "encap.h"

static __always_inline int verdict_pass(struct lb_global *g)
{
	g->c[ST_PASS]++;
	return XDP_PASS;
}

static __always_inline int verdict_drop(struct lb_global *g, int reason)
{
	g->c[ST_DROP]++;
	if (reason > 0 && reason < LB_GLOBAL_SLOTS)
		g->c[reason]++;
	return XDP_DROP;
}

/* Unsupported or broken packet on a VIP address: ours to drop. Anything else: pass. */
static __always_inline int drop_if_vip(struct lb_global *g, const __u32 *addr, __u8 family,
				       int reason)
{
	if (addr_is_vip(addr, family))
		return verdict_drop(g, reason);
	return verdict_pass(g);
}

/* A VIP packet that is not sent: counted for its VIP (a sent one is counted for its
 * backend only; user space adds a VIP's backends to its own counter). */
static __always_inline int vip_drop(struct lb_global *g, __u32 vip_id, __u32 frame_len,
				    int reason)
{
	count(&vip_stats, vip_stats_stride, vip_id, frame_len);
	return verdict_drop(g, reason);
}

/* Encapsulate toward `be` and send. The VIP was found by the caller. */
static __always_inline int forward(struct xdp_md *ctx, struct lb_global *g,
				   const struct lb_config *cfg, struct backend *be, __u32 hash,
				   const struct encap_info *ei, __u32 frame_len)
{
	__u32 zero_csum = 0;
	struct nexthop *nh;
	int err, act = XDP_TX;

	nh = bpf_map_lookup_elem(&nexthops, &be->nexthop_id);
	if (!nh || !be->nexthop_id || !(nh->dmac[0] | nh->dmac[1] | nh->dmac[2] | nh->dmac[3] |
					  nh->dmac[4] | nh->dmac[5]))
		return vip_drop(g, be->vip_id, frame_len, ST_DROP_NO_NEXTHOP);

	if (be->family == LB_AF_INET6)
		err = encap_v6(ctx, cfg, be, nh, ei, hash, &zero_csum);
	else
		err = encap_v4(ctx, cfg, be, nh, ei, hash, &zero_csum);
	if (err)
		return vip_drop(g, be->vip_id, frame_len, -err);

	if (cfg->tx_mode == LB_TX_REDIRECT) {
		/* An empty tx_port slot (not filled yet, or the kernel removed a device that
		 * went away) makes this XDP_DROP: count that as a drop, not as a redirect. */
		act = bpf_redirect_map(&tx_port, 0, XDP_DROP);
		if (act != XDP_REDIRECT)
			return vip_drop(g, be->vip_id, frame_len, ST_DROP_NO_NEXTHOP);
		g->c[ST_REDIRECT]++;
	} else {
		g->c[ST_TX]++;
	}
	if (zero_csum)
		g->c[ST_GUE_ZERO_CSUM]++;
	/* be is the entry of this CPU's struct backend_slot: its counters share the line */
	((struct backend_slot *)be)->c.packets++;
	((struct backend_slot *)be)->c.bytes += frame_len;
	return act;
}

/* Keys compared as the five 64-bit words they were written as. */
static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) |
		(x[4] ^ y[4])) == 0;
}

/* The backend of a flow-table entry, if the entry may still be honoured. */
static __always_inline struct backend *entry_backend(const struct flow_val *fv)
{
	struct backend *be = backend_lookup(fv->backend_id);

	if (be && (be->flags & BE_F_FLOWS_STAY) && be->vip_id == fv->vip_id && fv->vip_id &&
	    be->gen == fv->gen)
		return be;
	return NULL;
}

static __always_inline void cache_fill(struct flow_cache_slot *cs, const struct flow_key *fk,
				       const struct flow_val *fv)
{
	if (cs) {
		__builtin_memcpy(&cs->key, fk, sizeof(*fk));
		cs->val = *fv;
	}
}

/* May this CPU add one more entry to the connection table now? With a limit set, at
 * most lb_config.flow_insert_limit per one-second window (coarse clock; the window
 * restarts on the first new flow after it ends). Beyond that a new flow still goes
 * where the ring says, it is just not remembered, so a SYN flood cannot push the
 * established flows out of the LRU. */
static __always_inline int flow_insert_allowed(const struct lb_config *cfg)
{
	__u32 zero = 0;
	struct flow_rate *r;
	__u64 now;

	if (!cfg->flow_insert_limit)
		return 1;
	r = bpf_map_lookup_elem(&flow_rate, &zero);
	if (!r)
		return 1;
	now = bpf_ktime_get_coarse_ns();
	if (now - r->window_start_ns >= ONE_SEC_NS) {
		r->window_start_ns = now;
		r->inserts = 0;
	}
	if (r->inserts >= cfg->flow_insert_limit)
		return 0;
	r->inserts++;
	return 1;
}

/* A new flow (or one whose entry may not be honoured: moved): the VIP decides. No VIP ->
 * pass; else the ring picks a backend and the entry is (re)written, within the insert
 * limit. */
static __always_inline int lb_new_flow(struct xdp_md *ctx, struct lb_global *g,
				       const struct lb_config *cfg, const struct flow_key *fk,
				       const struct encap_info *ei, __u32 frame_len,
				       struct flow_cache_slot *cs, int moved)
{
	struct flow_val nv = {};
	struct vip_key vk = {};
	struct vip_meta *vm;
	struct backend *be;
	__u32 id, hash;

	__builtin_memcpy(vk.addr, fk->dst, 16);
	vk.port = fk->dport;
	vk.proto = fk->proto;
	vk.family = fk->family;
	vm = vip_lookup(&vk);
	if (!vm)
		return verdict_pass(g);
	g->c[moved ? ST_FLOW_MOVED : ST_FLOW_MISS]++;
	hash = flow_hash(fk, fk->family == LB_AF_INET6, vm->flags & VIP_F_HASH_SRC_ONLY);
	be = ring_pick(vm, hash, &id);
	if (!be)
		return vip_drop(g, vm->vip_id, frame_len, ST_DROP_NO_BACKEND);
	nv.backend_id = id;
	nv.vip_id = vm->vip_id;
	nv.hash = hash;
	nv.gen = be->gen;
	if (flow_insert_allowed(cfg)) {
		bpf_map_update_elem(&flows, fk, &nv, BPF_ANY);
		cache_fill(cs, fk, &nv);
	} else {
		/* packets forwarded without an entry: every packet of such a flow counts */
		g->c[ST_FLOW_INSERT_LIMITED]++;
	}
	return forward(ctx, g, cfg, be, hash, ei, frame_len);
}

/* One cache hit in 2^FLOW_CACHE_TOUCH_BITS (64) also asks `flows`, so the LRU entry of a flow
 * served from the cache stays young (a counter in the slot would dirty its line on every
 * hit). Which hits: the top bits of this CPU's packet count times the golden ratio, so
 * a flow whose packets come at a regular stride (every 2nd packet, say) is still picked
 * one time in 64, as a plain `count % 64` would not. */
static __always_inline int touch_due(__u64 rx)
{
	return ((rx * 0x9E3779B97F4A7C15ull) >> (64 - FLOW_CACHE_TOUCH_BITS)) == 0;
}

/* A TCP/UDP packet whose destination passed the prefilter. The connection table comes
 * first: an entry whose backend still takes existing flows and still belongs to the
 * entry's VIP forwards at once (one hash lookup; the hash was stored with the entry).
 * Otherwise the VIP decides: no VIP -> pass; else the ring picks a backend and the entry
 * is (re)written (lb_new_flow). A per-CPU direct-mapped cache of entries is asked before
 * the table: a slot with this flow's key and a still-valid entry saves the hash-table
 * lookup. It only holds what `flows` held for that key on this CPU, and is checked like a
 * `flows` entry, so a moved flow (maint/down) is never kept on its old backend by it. */
static __always_inline int lb_flow(struct xdp_md *ctx, struct lb_global *g,
				   const struct flow_key *fk, const struct encap_info *ei,
				   __u32 frame_len, int syn)
{
	__u32 zero = 0, slot = bpf_get_smp_processor_id() * (flow_cache_mask + 1) +
				(flow_cache_index(fk) & flow_cache_mask);
	struct flow_cache_slot *cs = bpf_map_lookup_elem(&flow_cache, &slot);
	struct lb_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct flow_val *fv = NULL;
	struct backend *be;

	if (!cfg) /* cannot happen (an array's one entry); the verifier wants the check */
		return verdict_pass(g);
	/* A SYN opens a connection: it goes where the ring says now, so it skips the cache
	 * and the table (two cache misses on a new flow) and overwrites whatever entry an
	 * earlier connection with the same 5-tuple left. Its retransmissions land on the
	 * same backend unless the ring changed in between; then the newer entry wins, and
	 * the rest of the connection follows it. (Another CPU's cache may still hold the old
	 * entry: like the per-CPU tables, this counts on RSS keeping a flow on one CPU.) A
	 * SYN over flow_insert_limit skips them too, as in Katran: under a flood the lookup
	 * would triple the cost of every flood SYN; the price is that a new connection
	 * reusing the 5-tuple of a remembered one, after a ring change, is split between the
	 * ring's backend (its SYN) and the old entry's (the rest). */
	if (!syn) {
		if (cs && cs->val.vip_id && flow_key_eq(&cs->key, fk)) {
			be = entry_backend(&cs->val);
			if (be) {
				if (touch_due(g->c[ST_RX]))
					bpf_map_lookup_elem(&flows, fk);
				g->c[ST_FLOW_HIT]++;
				g->c[ST_FLOW_CACHE_HIT]++;
				return forward(ctx, g, cfg, be, cs->val.hash, ei, frame_len);
			}
		}
		fv = bpf_map_lookup_elem(&flows, fk);
		if (fv) {
			be = entry_backend(fv);
			if (be) {
				cache_fill(cs, fk, fv);
				g->c[ST_FLOW_HIT]++;
				return forward(ctx, g, cfg, be, fv->hash, ei, frame_len);
			}
		}
	}
	return lb_new_flow(ctx, g, cfg, fk, ei, frame_len, cs, fv != NULL);
}

/* SYN without ACK: the first packet of a TCP connection. (parse_ports() checked the
 * whole TCP header; the verifier only tracks the shorter UDP length, so check again.) */
static __always_inline int tcp_is_syn(const struct l4_ports *ports, int proto, void *end)
{
	const __u8 *flags = (const __u8 *)ports + 13;

	return proto == IPPROTO_TCP && (void *)(flags + 1) <= end &&
	       (*flags & (LB_TCP_SYN | LB_TCP_ACK)) == LB_TCP_SYN;
}

/* The flow key is written with five 64-bit stores. Everything that reads it back (the
 * cache index and compare, the flow hash, the kernel's jhash) loads 32- or 64-bit words:
 * a load covered by one earlier store gets its value forwarded at once, while a load
 * spanning several narrower stores waits for them to retire (measured here: the biggest
 * single cost of a flow-cache hit before this). Byte order: the first four bytes of a
 * 64-bit word are its low half on little-endian machines. */
union flow_key_words {
	struct flow_key k;
	__u64 w[5];
};

static __always_inline __u64 first4(__u32 v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return v;
#else
	return (__u64)v << 32;
#endif
}

/* Bytes 32..39 of the key: the ports as in the packet, proto, family, zero padding. */
static __always_inline __u64 key_tail(const struct l4_ports *ports, __u8 proto, __u8 family)
{
	__u32 p = *(const __u32 *)ports;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return p | (__u64)proto << 32 | (__u64)family << 40;
#else
	return (__u64)p << 32 | (__u64)proto << 24 | (__u64)family << 16;
#endif
}

static __always_inline int l4_hdr_len(int proto)
{
	return proto == IPPROTO_TCP ? 20 : 8;
}

/* Parse an IPv4 packet into a flow key and encapsulation facts. Returns FLOW_FORWARD
 * when the packet is a TCP/UDP flow toward a possible VIP (*fk, *ei, *syn filled), else
 * the verdict (pass, or drop for a broken packet to a VIP address). */
static __always_inline int flow_ipv4(struct hdr_cursor *c, void *end, struct lb_global *g,
				     union flow_key_words *fk, struct encap_info *ei, int *syn)
{
	struct l4_ports *ports;
	struct iphdr *ip;
	__u32 tot_len;
	int proto;

	proto = parse_ipv4(c, end, &ip);
	if (proto < 0)
		return verdict_pass(g); /* too short to be for us; the stack discards it */
	if (!prefilter_hit(ip->daddr))
		return verdict_pass(g);
	if (ip->ihl != 5 || ip->version != 4)
		return drop_if_vip(g, &ip->daddr, LB_AF_INET,
				   ip->ihl > 5 ? ST_DROP_IP_OPTIONS : ST_DROP_MALFORMED);
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFMASK))
		return drop_if_vip(g, &ip->daddr, LB_AF_INET, ST_DROP_FRAGMENT);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return verdict_pass(g);
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < IPV4_HLEN + l4_hdr_len(proto) || (void *)ip + tot_len > end ||
	    parse_ports(c, end, proto, &ports) < 0)
		return drop_if_vip(g, &ip->daddr, LB_AF_INET, ST_DROP_MALFORMED);

	fk->w[0] = first4(ip->saddr);
	fk->w[1] = 0;
	fk->w[2] = first4(ip->daddr);
	fk->w[3] = 0;
	fk->w[4] = key_tail(ports, proto, LB_AF_INET);
	ei->inner_len = tot_len;
	ei->tos = ip->tos;
	ei->df = !!(ip->frag_off & bpf_htons(IP_DF));
	*syn = tcp_is_syn(ports, proto, end);
	return FLOW_FORWARD;
}

static __always_inline int ipv6_is_ext_header(int nh)
{
	switch (nh) {
	case 0:   /* hop-by-hop */
	case 43:  /* routing */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
		return 1;
	}
	return 0;
}

/* As flow_ipv4, for IPv6 (no extension headers). */
static __always_inline int flow_ipv6(struct hdr_cursor *c, void *end, struct lb_global *g,
				     union flow_key_words *fk, struct encap_info *ei, int *syn)
{
	struct l4_ports *ports;
	struct ipv6hdr *ip6;
	__u32 *dst, *src;
	__u32 plen;
	int proto;

	proto = parse_ipv6(c, end, &ip6);
	if (proto < 0)
		return verdict_pass(g);
	dst = ip6->daddr.in6_u.u6_addr32;
	if (!prefilter_hit(dst[0] ^ dst[1] ^ dst[2] ^ dst[3]))
		return verdict_pass(g);
	if (proto == NEXTHDR_FRAGMENT)
		return drop_if_vip(g, dst, LB_AF_INET6, ST_DROP_FRAGMENT);
	if (ipv6_is_ext_header(proto))
		return drop_if_vip(g, dst, LB_AF_INET6, ST_DROP_IP_OPTIONS);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return verdict_pass(g);
	plen = bpf_ntohs(ip6->payload_len);
	if (ip6->version != 6 || plen < l4_hdr_len(proto) ||
	    (void *)(ip6 + 1) + plen > end || parse_ports(c, end, proto, &ports) < 0)
		return drop_if_vip(g, dst, LB_AF_INET6, ST_DROP_MALFORMED);

	src = ip6->saddr.in6_u.u6_addr32;
	fk->w[0] = *(const __u64 *)src;
	fk->w[1] = *(const __u64 *)(src + 2);
	fk->w[2] = *(const __u64 *)dst;
	fk->w[3] = *(const __u64 *)(dst + 2);
	fk->w[4] = key_tail(ports, proto, LB_AF_INET6);
	ei->inner_len = IPV6_HLEN + plen;
	ei->inner_v6 = 1;
	ei->tos = (bpf_ntohl(*(__be32 *)ip6) >> 20) & 0xFF;
	*syn = tcp_is_syn(ports, proto, end);
	return FLOW_FORWARD;
}

#endif
