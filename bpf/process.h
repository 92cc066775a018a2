/* SPDX-License-Identifier: GPL-2.0 */
/* A parsed flow's way out: the connection table, or the VIP's ring for a new flow, then
 * encapsulation and the send. */
#ifndef XDPLB_PROCESS_H
#define XDPLB_PROCESS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "select.h"
#include "encap.h"
#include "flowkey.h"
#include "flowtable.h"
#include "verdict.h"
#include "ratelimit.h"
#include "icmp_answer.h"
#include "quic.h"

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
	if (!nh || !be->nexthop_id ||
	    !(*(const __u32 *)&nh->dmac[0] | *(const __u16 *)&nh->dmac[4]))
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
 * established flows out of the table. For a packet whose lb_new_flow has called
 * window_open already (the window is current). */
static __always_inline int flow_insert_allowed(const struct lb_config *cfg)
{
	return !cfg->flow_insert_limit ||
	       window_take_current(&flow_rate, cfg->flow_insert_limit);
}

/* A new flow (or one whose entry may not be honoured: moved): the VIP decides. No VIP ->
 * pass; else the ring picks a backend and the entry is (re)written, within the insert
 * limit. */
static __always_inline int lb_new_flow(struct xdp_md *ctx, struct lb_global *g,
				       const struct lb_config *cfg, const struct flow_key *fk,
				       const struct encap_info *ei, __u32 frame_len,
				       __u32 bucket, __u32 own, int moved)
{
	union vip_buf vbuf;
	struct vip_meta *vm = vip_of_flow(fk, &vbuf);
	struct flow_val nv = {};
	struct backend *be;
	__u32 id, hash, zero = 0, *busy;
	int res, act;

	if (!vm)
		return verdict_pass(g);
	g->c[moved ? ST_FLOW_MOVED : ST_FLOW_MISS]++;
	hash = flow_hash(fk, fk->family == LB_AF_INET6, vm->flags & VIP_F_HASH_SRC_ONLY);
	busy = bpf_map_lookup_elem(&ft_busy, &zero);
	/* over flow_insert_limit (a flood) the entry is not written: fetch nothing */
	if (!cfg->flow_insert_limit || window_open(&flow_rate, cfg->flow_insert_limit))
		ft_prefetch(bucket, own, busy && (*busy & 0xff) == 0xff);
	be = ring_pick(vm, hash, &id);
	if (!be)
		return vip_drop(g, vm->vip_id, frame_len, ST_DROP_NO_BACKEND);
	nv.backend_id = id;
	nv.vip_id = vm->vip_id;
	nv.hash = hash;
	nv.gen = be->gen;
	/* the packet first, the entry after: its line (ft_prefetch) arrives meanwhile */
	act = forward(ctx, g, cfg, be, hash, ei, frame_len);
	if (flow_insert_allowed(cfg)) {
		res = ft_store(bucket, own, fk, &nv);
		if (busy)
			*busy = *busy << 1 | (res != FT_STORED);
		if (res == FT_EVICTED)
			g->c[ST_FLOW_EVICTED]++;
		else if (res == FT_RACED)
			g->c[ST_FLOW_INSERT_RACED]++;
	} else {
		/* packets forwarded without an entry: every packet of such a flow counts */
		g->c[ST_FLOW_INSERT_LIMITED]++;
	}
	return act;
}

/* A TCP/UDP packet whose destination passed the prefilter. The connection table comes
 * first: an entry whose backend still takes existing flows and still belongs to the
 * entry's VIP forwards at once (the hash was stored with the entry). The flow's own slot
 * is read first, one cache line, where nearly every hit is found; then the rest of its
 * bucket. Otherwise the VIP decides: no VIP -> pass; else the ring picks a backend and
 * the entry is (re)written (lb_new_flow). A hit marks its entry used (age 0) only when it
 * was not, so a busy flow does not dirty its line on every packet. */
static __always_inline int lb_flow(struct xdp_md *ctx, struct lb_global *g,
				   const struct lb_config *cfg, const struct flow_key *fk,
				   const struct encap_info *ei, __u32 frame_len, int syn)
{
	const __u64 *w = (const void *)fk; /* written as five 64-bit words (flowkey.h) */
	__u32 h = flow_slot_hash_x64(w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4]);
	__u32 bucket = ft_bucket(h), own = ft_own(h);
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	struct flow_slot *s;
	struct flow_val fv, hv; /* hv: the own slot's entry, kept out of memory */
	struct backend *be;
	int found = -1;

	if (!b) /* cannot happen (in range); the verifier wants the check */
		return verdict_pass(g);
	s = ft_slot(b, own);
	/* A SYN opens a connection: it goes where the ring says now, so it skips the lookup
	 * and overwrites whatever entry an earlier connection with the same 5-tuple left.
	 * Its retransmissions land on the same backend unless the ring changed in between;
	 * then the newer entry wins, and the rest of the connection follows it, on every CPU
	 * (there is one table). A SYN over flow_insert_limit skips the lookup too, as in
	 * Katran: the price is that a new connection reusing the 5-tuple of a remembered
	 * one, after a ring change, is split between the ring's backend (its SYN) and the
	 * old entry's (the rest). */
	if (!syn && ft_read(s, fk, &hv) > 0) {
		be = entry_backend(&hv);
		if (be) {
			if (s->age)
				s->age = 0;
			g->c[ST_FLOW_HIT]++;
			g->c[ST_FLOW_CACHE_HIT]++;
			return forward(ctx, g, cfg, be, hv.hash, ei, frame_len);
		}
		found = 0;
	} else if (!syn && (found = ft_find(bucket, fk, &fv)) >= 0) {
		be = entry_backend(&fv);
		if (be) {
			ft_promote(bucket, own, found);
			g->c[ST_FLOW_HIT]++;
			return forward(ctx, g, cfg, be, fv.hash, ei, frame_len);
		}
	}
	return lb_new_flow(ctx, g, cfg, fk, ei, frame_len, bucket, own, found >= 0);
}

/* A UDP packet, before lb_flow: a QUIC short header whose connection ID names a usable
 * backend goes there whatever its 5-tuple (quic.h). FLOW_KEY_READY: not routed so, on
 * to lb_flow. */
static __always_inline int lb_quic(struct xdp_md *ctx, struct lb_global *g,
				   const struct lb_config *cfg, const struct flow_key *fk,
				   const struct encap_info *ei, __u32 frame_len)
{
	__u32 hash;
	struct backend *be = quic_backend(ctx, g, fk, ei, &hash);

	if (!be)
		return FLOW_KEY_READY;
	return forward(ctx, g, cfg, be, hash, ei, frame_len);
}

#endif
