/* SPDX-License-Identifier: GPL-2.0 */
/* ICMP to a possible VIP address (the prefilter hit; IPv4 without options, not a
 * fragment; IPv6 without extension headers):
 *  - an error about a VIP flow's reply (destination unreachable, any code; time
 *    exceeded; ICMPv6 packet too big) goes to the backend that flow maps to: the quoted
 *    packet, reversed, is the flow's key, looked up in the connection table (never
 *    inserted), else hashed onto the VIP's ring as a new packet of the flow would be.
 *    Backends answer clients directly, so this is how a backend's kernel learns a path
 *    MTU on the way back to its client.
 *  - an echo request to a VIP address is answered from it (lb_config.answer_ping).
 * Anything else (other types, quotes too short to hold the ports, quotes of packets that
 * are not from the VIP address this error came to) passes to the kernel, as before. */
#ifndef XDPLB_ICMP_H
#define XDPLB_ICMP_H

#include <linux/bpf.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "process.h"
#include "icmp_answer.h"

/* The flow whose reply an error quotes: its key is written to *fk by the caller. */
static __always_inline int icmp_to_backend(struct xdp_md *ctx, struct lb_global *g,
					   const struct lb_config *cfg,
					   const struct flow_key *fk, const struct encap_info *ei)
{
	__u32 frame_len = ctx->data_end - ctx->data, hash, id, h = flow_slot_hash(fk);
	union { /* the entry found, else the VIP's key: one buffer (this stack is tight) */
		struct flow_val fv;
		struct vip_key vip;
	} buf;
	struct backend *be = ft_find(ft_bucket(h), fk, &buf.fv) >= 0 ? entry_backend(&buf.fv) : NULL;
	struct vip_meta *vm;
	int v;

	if (be) {
		hash = buf.fv.hash;
	} else {
		vm = vip_of_flow_slow(fk, &buf.vip);
		if (!vm)
			return verdict_pass(g);
		hash = flow_hash(fk, fk->family == LB_AF_INET6, vm->flags & VIP_F_HASH_SRC_ONLY);
		be = ring_pick(vm, hash, &id);
		if (!be)
			return vip_drop(g, vm->vip_id, frame_len, ST_DROP_NO_BACKEND);
	}
	v = forward(ctx, g, cfg, be, hash, ei, frame_len);
	if (v == XDP_TX || v == XDP_REDIRECT)
		g->c[ST_ICMP_FORWARDED]++;
	return v;
}

/* The key of `config`, kept out of the stack of the ICMP paths (no room there). */
static const __u32 icmp_config_key = 0;

static __always_inline __u64 reversed_tail(const struct l4_ports *q, __u8 proto, __u8 family)
{
	struct l4_ports r = { .source = q->dest, .dest = q->source };

	return key_tail(&r, proto, family);
}

static __noinline int lb_icmp4(struct xdp_md *ctx, struct lb_global *g)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + ETH_HLEN, *q;
	struct encap_info ei = {};
	union flow_key_words fk;
	struct lb_config *cfg;
	struct l4_ports *qp;
	struct icmp4_hdr *ic;
	__u32 len;

	cfg = bpf_map_lookup_elem(&config, &icmp_config_key);
	ic = (void *)(ip + 1);
	if (!cfg || (void *)(ic + 1) > end)
		return verdict_pass(g);
	len = bpf_ntohs(ip->tot_len);
	if (len < IPV4_HLEN + ICMP_HLEN || (void *)ip + len > end)
		return verdict_pass(g);
	if (ic->type == ICMP_ECHO) {
		if (!cfg->answer_ping || !addr_is_vip(&ip->daddr, LB_AF_INET) ||
		    echo_reply_v4(ctx))
			return verdict_pass(g);
		g->c[ST_ECHO_ANSWERED]++;
		g->c[ST_TX]++;
		return XDP_TX;
	}
	if (ic->type != ICMP_DEST_UNREACH && ic->type != ICMP_TIME_EXCEEDED)
		return verdict_pass(g);
	q = (void *)(ic + 1);
	qp = (void *)(q + 1);
	if (len < IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + sizeof(*qp) || (void *)(qp + 1) > end)
		return verdict_pass(g);
	if (q->version != 4 || q->ihl != 5 || (q->frag_off & bpf_htons(IP_OFFMASK)) ||
	    (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP) || q->saddr != ip->daddr)
		return verdict_pass(g);
	fk.w[0] = first4(q->daddr);
	fk.w[1] = 0;
	fk.w[2] = first4(q->saddr);
	fk.w[3] = 0;
	fk.w[4] = reversed_tail(qp, q->protocol, LB_AF_INET);
	ei.inner_len = len;
	ei.tos = ip->tos;
	ei.df = !!(ip->frag_off & bpf_htons(IP_DF));
	ei.icmp = 1;
	return icmp_to_backend(ctx, g, cfg, &fk.k, &ei);
}

static __always_inline int addr6_eq(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __noinline int lb_icmp6(struct xdp_md *ctx, struct lb_global *g)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN, *q;
	struct encap_info ei = {};
	union flow_key_words fk;
	struct lb_config *cfg;
	struct l4_ports *qp;
	struct icmp6hdr *ic;
	__u32 plen, *dst;

	cfg = bpf_map_lookup_elem(&config, &icmp_config_key);
	ic = (void *)(ip6 + 1);
	if (!cfg || (void *)(ic + 1) > end)
		return verdict_pass(g);
	plen = bpf_ntohs(ip6->payload_len);
	if (plen < ICMP_HLEN || (void *)(ip6 + 1) + plen > end)
		return verdict_pass(g);
	dst = ip6->daddr.in6_u.u6_addr32;
	if (ic->icmp6_type == ICMPV6_ECHO_REQUEST) {
		if (!cfg->answer_ping || !addr_is_vip(dst, LB_AF_INET6) || echo_reply_v6(ctx))
			return verdict_pass(g);
		g->c[ST_ECHO_ANSWERED]++;
		g->c[ST_TX]++;
		return XDP_TX;
	}
	if (ic->icmp6_type != ICMPV6_DEST_UNREACH && ic->icmp6_type != ICMPV6_PKT_TOOBIG &&
	    ic->icmp6_type != ICMPV6_TIME_EXCEED)
		return verdict_pass(g);
	q = (void *)(ic + 1);
	qp = (void *)(q + 1);
	if (plen < ICMP_HLEN + IPV6_HLEN + sizeof(*qp) || (void *)(qp + 1) > end)
		return verdict_pass(g);
	if (q->version != 6 || (q->nexthdr != IPPROTO_TCP && q->nexthdr != IPPROTO_UDP) ||
	    !addr6_eq(q->saddr.in6_u.u6_addr32, dst))
		return verdict_pass(g);
	fk.w[0] = *(const __u64 *)q->daddr.in6_u.u6_addr32;
	fk.w[1] = *(const __u64 *)(q->daddr.in6_u.u6_addr32 + 2);
	fk.w[2] = *(const __u64 *)dst;
	fk.w[3] = *(const __u64 *)(dst + 2);
	fk.w[4] = reversed_tail(qp, q->nexthdr, LB_AF_INET6);
	ei.inner_len = IPV6_HLEN + plen;
	ei.inner_v6 = 1;
	ei.tos = (bpf_ntohl(*(__be32 *)ip6) >> 20) & 0xFF;
	ei.icmp = 1;
	return icmp_to_backend(ctx, g, cfg, &fk.k, &ei);
}

#endif
