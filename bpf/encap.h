/* SPDX-License-Identifier: GPL-2.0 */
/* Encapsulation toward a backend: IPIP / IPv6-in-IPv4 under an IPv4 outer header,
 * IP6IP6 / IPv4-in-IPv6 under an IPv6 one, or GUE (direct IP in UDP) over either.
 * Outer TTL 64, inner ToS copied out, IPv4 DF copied (always set over IPv6 inners),
 * flow hash in the IPv6 flow label and in the GUE source port. */
#ifndef XDPLB_ENCAP_H
#define XDPLB_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"
#include "lb_structs.h"
#include "csum.h"

/* What the parser learned about the packet being encapsulated. */
struct encap_info {
	__u32 inner_len; /* inner L3 length from the IP header (frame padding excluded) */
	__u8 inner_v6;
	__u8 tos;        /* IPv4 ToS or IPv6 traffic class */
	__u8 df;         /* inner IPv4 had DF */
	__u8 icmp;       /* an ICMP error relayed to a flow's backend: never answered with one */
};

/* One's complement sum of the whole inner packet, without reading its payload: a valid
 * IPv4 header sums to 0xffff (adds nothing); an L4 segment with a valid checksum sums
 * to the complement of its pseudo-header. Returns 0 when the inner UDP/IPv4 checksum is
 * absent (0), in which case the caller sends the GUE UDP checksum as 0. */
static __always_inline int inner_sum_v4(void *inner, void *end, __u64 *sum)
{
	struct iphdr *ip = inner;
	struct udphdr *udp = inner + IPV4_HLEN;
	__u64 p;

	if ((void *)(udp + 1) > end)
		return 0;
	if (ip->protocol == IPPROTO_UDP && udp->check == 0)
		return 0;
	if (ip->protocol == IPPROTO_ICMP) { /* its checksum has no pseudo-header */
		*sum = 0;
		return 1;
	}
	p = csum_addr(&ip->saddr, 2) +
	    csum_pseudo_tail(ip->protocol, bpf_ntohs(ip->tot_len) - IPV4_HLEN);
	*sum = (__u16)~csum_fold32(p);
	return 1;
}

static __always_inline int inner_sum_v6(void *inner, void *end, __u64 *sum)
{
	struct ipv6hdr *ip6 = inner;
	__u64 p;

	if ((void *)(ip6 + 1) > end)
		return 0;
	p = csum_addr(ip6->saddr.in6_u.u6_addr32, 4) + csum_addr(ip6->daddr.in6_u.u6_addr32, 4) +
	    csum_pseudo_tail(ip6->nexthdr, bpf_ntohs(ip6->payload_len));
	*sum = (__u16)~csum_fold32(p) + csum_words((const __u16 *)ip6, IPV6_HLEN / 2);
	return 1;
}

/* u: the UDP header just written, as values (summed from registers, not read back). */
static __always_inline __u16 gue_udp_csum(__u64 outer_addr_sum, struct udphdr u,
					  void *inner, void *end, int inner_v6, __u32 *zero)
{
	__u64 s = 0;
	int ok = inner_v6 ? inner_sum_v6(inner, end, &s) : inner_sum_v4(inner, end, &s);
	__u16 c;

	if (!ok) {
		*zero = 1;
		return 0;
	}
	s += outer_addr_sum + csum_pseudo_tail(IPPROTO_UDP, bpf_ntohs(u.len));
	s += (__u64)u.source + u.dest + u.len;
	c = ~csum_fold32(s);
	return c ? c : 0xffff;
}

/* In 16- and 32-bit words: a 6-byte memcpy into the packet (alignment unknown) is twelve
 * byte loads and stores. Loads keep their alignment (dmac starts an 8-byte map value,
 * smac a 2-byte aligned field); the packet takes any. */
static __always_inline void write_eth(struct ethhdr *eth, const struct lb_config *cfg,
				      const struct nexthop *nh, __u16 proto)
{
	const __u16 *sm = (const __u16 *)cfg->smac;
	void *p = eth;

	*(__u32 *)p = *(const __u32 *)nh->dmac;
	*(__u16 *)(p + 4) = *(const __u16 *)&nh->dmac[4];
	*(__u16 *)(p + 6) = sm[0];
	*(__u16 *)(p + 8) = sm[1];
	*(__u16 *)(p + 10) = sm[2];
	eth->h_proto = bpf_htons(proto);
}

/* The GUE UDP header after the outer IP header; its checksum is summed from the values
 * written (outer_addr_sum: the outer addresses' sum), not from the bytes read back. */
static __always_inline void write_gue(struct udphdr *udp, const struct lb_config *cfg,
				      __u32 hash, const struct encap_info *ei,
				      __u64 outer_addr_sum, void *end, __u32 *zero_csum)
{
	struct udphdr u;

	u.source = bpf_htons(GUE_SPORT_BASE | (hash & GUE_SPORT_MASK));
	u.dest = cfg->gue_port;
	u.len = bpf_htons(UDP_HLEN + ei->inner_len);
	u.check = 0;
	udp->source = u.source;
	udp->dest = u.dest;
	udp->len = u.len;
	udp->check = gue_udp_csum(outer_addr_sum, u, udp + 1, end, ei->inner_v6, zero_csum);
}

/* Make room for `outer` bytes of outer headers (an outer IP header of ip_hlen bytes,
 * maybe GUE) in front of the inner packet, within the MTU. Returns 0 with data and end
 * set to the new frame, or a negative lb_stat index naming why the packet must be
 * dropped. Every inner packet is at least 20 bytes, so the outer IP header + 8 bytes
 * always fit: proving it is for the verifier. */
static __always_inline int encap_room(struct xdp_md *ctx, const struct lb_config *cfg,
				      const struct encap_info *ei, __u32 outer, __u32 ip_hlen,
				      void **data, void **end)
{
	if (ei->inner_len + outer > cfg->mtu)
		return -ST_DROP_TOO_BIG;
	if (bpf_xdp_adjust_head(ctx, -(int)outer))
		return -ST_DROP_ADJUST_FAIL;
	*data = (void *)(long)ctx->data;
	*end = (void *)(long)ctx->data_end;
	if (*data + ETH_HLEN + ip_hlen + UDP_HLEN > *end)
		return -ST_DROP_MALFORMED;
	return 0;
}

/* Returns 0, or a negative lb_stat index naming why the packet must be dropped.
 * *zero_csum is set when a GUE checksum had to be sent as 0. */
static __always_inline int encap_v4(struct xdp_md *ctx, const struct lb_config *cfg,
				    const struct backend *be, const struct nexthop *nh,
				    const struct encap_info *ei, __u32 hash, __u32 seq,
				    __u32 *zero_csum)
{
	int gue = cfg->encap == LB_ENCAP_GUE;
	__u32 ol = IPV4_HLEN + (gue ? UDP_HLEN : 0);
	__u32 w0, w1, w2, src, dst, *hdr;
	void *data, *end;
	struct iphdr *ip;
	int err = encap_room(ctx, cfg, ei, ol, IPV4_HLEN, &data, &end);

	if (err)
		return err;
	ip = data + ETH_HLEN;
	write_eth(data, cfg, nh, ETH_P_IP);
	/* The header is built in registers, written in 32-bit words and summed from the
	 * registers: reading freshly written bytes back for the checksum stalls. Words in
	 * network order: version/IHL, ToS, total length | ID, flags (DF) | TTL,
	 * protocol, checksum 0 | source | destination. With DF the packet is atomic and
	 * its ID 0 (RFC 6864); without, it may be fragmented on the way, so the ID varies:
	 * the flow hash plus `seq`, a per-CPU packet count. */
	w0 = bpf_htonl(0x45000000u | (__u32)ei->tos << 16 | (ol + ei->inner_len));
	w1 = (ei->df || ei->inner_v6) ? bpf_htonl(IP_DF) : bpf_htonl((hash + seq) << 16);
	w2 = bpf_htonl((__u32)OUTER_TTL << 24 |
		       (__u32)(gue ? IPPROTO_UDP :
			       (ei->inner_v6 ? IPPROTO_IPV6_ENC : IPPROTO_IPIP)) << 16);
	src = cfg->src_v4;
	dst = be->addr[0];
	hdr = (__u32 *)ip;
	hdr[0] = w0;
	hdr[1] = w1;
	hdr[2] = w2;
	hdr[3] = src;
	hdr[4] = dst;
	ip->check = ~csum_fold32((__u64)w0 + w1 + w2 + src + dst);

	if (gue) {
		struct udphdr *udp = (void *)(ip + 1);

		write_gue(udp, cfg, hash, ei, (__u64)src + dst, end, zero_csum);
	}
	return 0;
}

static __always_inline int encap_v6(struct xdp_md *ctx, const struct lb_config *cfg,
				    const struct backend *be, const struct nexthop *nh,
				    const struct encap_info *ei, __u32 hash, __u32 *zero_csum)
{
	int gue = cfg->encap == LB_ENCAP_GUE;
	__u32 ol = IPV6_HLEN + (gue ? UDP_HLEN : 0);
	void *data, *end;
	struct ipv6hdr *ip6;
	int err = encap_room(ctx, cfg, ei, ol, IPV6_HLEN, &data, &end);

	if (err)
		return err;
	ip6 = data + ETH_HLEN;
	write_eth(data, cfg, nh, ETH_P_IPV6);
	*(__be32 *)ip6 = bpf_htonl((6u << 28) | ((__u32)ei->tos << 20) | (hash & 0xFFFFF));
	ip6->payload_len = bpf_htons(ei->inner_len + (gue ? UDP_HLEN : 0));
	ip6->nexthdr = gue ? IPPROTO_UDP : (ei->inner_v6 ? IPPROTO_IPV6_ENC : IPPROTO_IPIP);
	ip6->hop_limit = OUTER_TTL;
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr32, cfg->src_v6, 16);
	__builtin_memcpy(ip6->daddr.in6_u.u6_addr32, be->addr, 16);

	if (gue) {
		struct udphdr *udp = (void *)(ip6 + 1);

		write_gue(udp, cfg, hash, ei, csum_addr(cfg->src_v6, 4) + csum_addr(be->addr, 4),
			  end, zero_csum);
	}
	return 0;
}

#endif
