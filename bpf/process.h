/* SPDX-License-Identifier: GPL-2.0 */
/* A parsed flow's way out: the per-CPU flow cache, the connection table, or the VIP's
 * ring for a new flow, then encapsulation and the send. */
#ifndef XDPLB_PROCESS_H
#define XDPLB_PROCESS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "select.h"
#include "encap.h"
#include "flowkey.h"
#include "flowcache.h"
#include "verdict.h"
#include "ratelimit.h"
#include "icmp_answer.h"

/* A packet for a VIP that is too big once encapsulated. With DF (always for IPv6) the
 * client is told the MTU that fits, from the VIP address, within this CPU's budget of
 * answers; without DF, or over the budget, it is dropped. Either way the packet counts
 * for its VIP, not for a backend. */
static __always_inline int too_big(struct xdp_md *ctx, struct lb_global *g,
				   const struct lb_config *cfg, const struct backend *be,
				   const struct encap_info *ei, __u32 frame_len)
{
	__u32 ol = (be->family == LB_AF_INET6 ? IPV6_HLEN : IPV4_HLEN) +
		   (cfg->encap == LB_ENCAP_GUE ? UDP_HLEN : 0);
	__u32 mtu = cfg->mtu > ol ? cfg->mtu - ol : 0;

	if (ei->icmp || !(ei->df || ei->inner_v6) ||
	    mtu < (ei->inner_v6 ? IPV6_MIN_MTU : IPV4_MIN_MTU))
		return vip_drop(g, be->vip_id, frame_len, ST_DROP_TOO_BIG);
	if (!cfg->too_big_per_sec || !window_take(&too_big_rate, cfg->too_big_per_sec)) {
		g->c[ST_TOO_BIG_LIMITED]++;
		return vip_drop(g, be->vip_id, frame_len, ST_DROP_TOO_BIG);
	}
	if (ei->inner_v6 ? too_big_v6(ctx, mtu) : too_big_v4(ctx, mtu))
		return vip_drop(g, be->vip_id, frame_len, ST_DROP_ADJUST_FAIL);
	count(&vip_stats, vip_stats_stride, be->vip_id, frame_len);
	g->c[ST_TOO_BIG_ANSWERED]++;
	g->c[ST_TX]++;
	return XDP_TX;
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
		err = encap_v4(ctx, cfg, be, nh, ei, hash, g->c[ST_RX], &zero_csum);
	if (err) {
		if (err == -ST_DROP_TOO_BIG)
			return too_big(ctx, g, cfg, be, ei, frame_len);
		return vip_drop(g, be->vip_id, frame_len, -err);
	}

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

/* The backend of a flow-table entry, if the entry may still be honoured. */
static __always_inline struct backend *entry_backend(const struct flow_val *fv)
{
	struct backend *be = backend_lookup(fv->backend_id);

	if (be && (be->flags & BE_F_FLOWS_STAY) && be->vip_id == fv->vip_id && fv->vip_id &&
	    be->gen == fv->gen)
		return be;
	return NULL;
}

/* May this CPU add one more entry to the connection table now? With a limit set, at
 * most lb_config.flow_insert_limit per one-second window (coarse clock; the window
 * restarts on the first new flow after it ends). Beyond that a new flow still goes
 * where the ring says, it is just not remembered, so a SYN flood cannot push the
 * established flows out of the LRU. */
static __always_inline int flow_insert_allowed(const struct lb_config *cfg)
{
	return !cfg->flow_insert_limit || window_take(&flow_rate, cfg->flow_insert_limit);
}

/* A new flow (or one whose entry may not be honoured: moved): the VIP decides. No VIP ->
 * pass; else the ring picks a backend and the entry is (re)written, within the insert
 * limit, and no other CPU's cache keeps the entry it replaced. */
static __always_inline int lb_new_flow(struct xdp_md *ctx, struct lb_global *g,
				       const struct lb_config *cfg, const struct flow_key *fk,
				       const struct encap_info *ei, __u32 frame_len,
				       struct flow_cache_slot *cs, int moved)
{
	struct vip_meta *vm = vip_of_flow(fk);
	struct flow_val nv = {};
	struct backend *be;
	__u32 id, hash, idx, *seq, seen;

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
		idx = flow_cache_index(fk) & flow_cache_mask;
		seq = flow_seq_of(idx);
		seen = seq_read(seq);
		bpf_map_update_elem(&flows, fk, &nv, BPF_ANY);
		cache_publish(cs, fk, &nv, idx, seq, seen);
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
 * lookup. It only holds what `flows` holds for that key (flowcache.h), and is checked
 * like a `flows` entry, so a moved flow (maint/down) is never kept on its old backend. */
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
	__u32 *seq, seen;

	if (!cfg) /* cannot happen (an array's one entry); the verifier wants the check */
		return verdict_pass(g);
	/* A SYN opens a connection: it goes where the ring says now, so it skips the cache
	 * and the table (two cache misses on a new flow) and overwrites whatever entry an
	 * earlier connection with the same 5-tuple left. Its retransmissions land on the
	 * same backend unless the ring changed in between; then the newer entry wins, and
	 * the rest of the connection follows it, on every CPU (lb_new_flow empties other
	 * CPUs' cached copies of the old entry). A
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
		/* computed again, not kept from above: keeping it live spilled registers on the
		 * hit path */
		seq = flow_seq_of(flow_cache_index(fk) & flow_cache_mask);
		seen = seq_read(seq);
		fv = bpf_map_lookup_elem(&flows, fk);
		if (fv) {
			be = entry_backend(fv);
			if (be) {
				cache_fill_checked(cs, fk, fv, seq, seen);
				g->c[ST_FLOW_HIT]++;
				return forward(ctx, g, cfg, be, fv->hash, ei, frame_len);
			}
		}
	}
	return lb_new_flow(ctx, g, cfg, fk, ei, frame_len, cs, fv != NULL);
}

#endif
