/* SPDX-License-Identifier: GPL-2.0 */
/* ICMP messages the LB itself sends from a VIP address: echo replies, and "fragmentation
 * needed" (IPv4) / "packet too big" (IPv6) for packets too big to encapsulate. Each
 * builder rewrites the received frame in place and returns 0 when it is ready for XDP_TX
 * (back to where it came from: Ethernet addresses swapped), or -1. Not inlined: they are
 * rare, and the hit path's instructions stay together. */
#ifndef XDPLB_ICMP_ANSWER_H
#define XDPLB_ICMP_ANSWER_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/icmpv6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"
#include "csum.h"

/* An ICMPv4 header; for "fragmentation needed" rest_lo is the next-hop MTU. */
struct icmp4_hdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__be16 rest_hi;
	__be16 rest_lo;
};

/* One's complement sum of [p, end), at most ICMP6_QUOTE_MAX + ICMP_HLEN bytes, in memory
 * order (fold it with csum_fold32). */
static __always_inline __u64 csum_span(void *p, void *end)
{
	__u64 s = 0;
	__u16 last = 0;

#pragma clang loop unroll(disable)
	for (int i = 0; i < (ICMP6_QUOTE_MAX + ICMP_HLEN) / 4; i++) {
		if (p + 4 > end)
			break;
		s += *(__u32 *)p;
		p += 4;
	}
	if (p + 2 <= end) {
		s += *(__u16 *)p;
		p += 2;
	}
	if (p + 1 <= end) {
		*(__u8 *)&last = *(__u8 *)p; /* the odd byte, zero-padded as RFC 1071 says */
		s += last;
	}
	return s;
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[ETH_ALEN];

	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
}

/* RFC 1624: the checksum after the 16-bit word at `w` changes from `old` to its value now. */
static __always_inline __u16 csum_replace16(__u16 check, __u16 old, __u16 new)
{
	return ~csum_fold32((__u64)(__u16)~check + (__u16)~old + new);
}

/* Keep the frame's Ethernet header and `keep` bytes of its IP packet, then make room for
 * `hdrs` bytes of new headers in front of that IP packet. Ethernet addresses come back
 * swapped in *eth_out. */
static __always_inline int quote_frame(struct xdp_md *ctx, __u32 keep, __u32 hdrs,
				       struct ethhdr *eth_out)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 len = end - data;

	if ((void *)(eth + 1) > end || ETH_HLEN + keep > len)
		return -1;
	__builtin_memcpy(eth_out->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth_out->h_source, eth->h_dest, ETH_ALEN);
	eth_out->h_proto = eth->h_proto;
	if (len > ETH_HLEN + keep && bpf_xdp_adjust_tail(ctx, -(int)(len - ETH_HLEN - keep)))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)hdrs))
		return -1;
	return 0;
}

/* "Fragmentation needed" (type 3 code 4) for the IPv4 packet in the frame, advertising
 * `mtu`, from its destination (the VIP) to its source, quoting as much of it as fits in
 * 576 bytes. The caller checked the IPv4 header and its length. */
static __noinline int too_big_v4(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct icmp4_hdr *ic;
	struct ethhdr eth;
	__u32 n, src, dst, w0, w1, w2;

	if ((void *)(ip + 1) > end)
		return -1;
	n = bpf_ntohs(ip->tot_len);
	if (n > ICMP4_QUOTE_MAX)
		n = ICMP4_QUOTE_MAX;
	src = ip->daddr;
	dst = ip->saddr;
	if (quote_frame(ctx, n, IPV4_HLEN + ICMP_HLEN, &eth))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip = data + ETH_HLEN;
	ic = (void *)(ip + 1);
	if ((void *)(ic + 1) > end)
		return -1;
	__builtin_memcpy(data, &eth, ETH_HLEN);
	/* DF set and ID 0: an atomic datagram (RFC 6864), never larger than 576 bytes */
	w0 = bpf_htonl(0x45000000u | (IPV4_HLEN + ICMP_HLEN + n));
	w1 = bpf_htonl(IP_DF);
	w2 = bpf_htonl((__u32)OUTER_TTL << 24 | (__u32)IPPROTO_ICMP << 16);
	((__u32 *)ip)[0] = w0;
	((__u32 *)ip)[1] = w1;
	((__u32 *)ip)[2] = w2;
	ip->saddr = src;
	ip->daddr = dst;
	ip->check = ~csum_fold32((__u64)w0 + w1 + w2 + src + dst);
	ic->type = ICMP_DEST_UNREACH;
	ic->code = ICMP_FRAG_NEEDED;
	ic->checksum = 0;
	ic->rest_hi = 0;
	ic->rest_lo = bpf_htons(mtu);
	ic->checksum = ~csum_fold32(csum_span(ic, end));
	return 0;
}

/* "Packet too big" (type 2) for the IPv6 packet in the frame, advertising `mtu`, from its
 * destination (the VIP) to its source, quoting as much of it as fits in 1280 bytes. */
static __noinline int too_big_v6(struct xdp_md *ctx, __u32 mtu)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct in6_addr src, dst;
	struct icmp6hdr *ic;
	struct ethhdr eth;
	__u32 n;
	__u64 s;

	if ((void *)(ip6 + 1) > end)
		return -1;
	n = IPV6_HLEN + bpf_ntohs(ip6->payload_len);
	if (n > ICMP6_QUOTE_MAX)
		n = ICMP6_QUOTE_MAX;
	__builtin_memcpy(&src, &ip6->daddr, sizeof(src));
	__builtin_memcpy(&dst, &ip6->saddr, sizeof(dst));
	if (quote_frame(ctx, n, IPV6_HLEN + ICMP_HLEN, &eth))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip6 = data + ETH_HLEN;
	ic = (void *)(ip6 + 1);
	if ((void *)(ic + 1) > end)
		return -1;
	__builtin_memcpy(data, &eth, ETH_HLEN);
	*(__be32 *)ip6 = bpf_htonl(6u << 28);
	ip6->payload_len = bpf_htons(ICMP_HLEN + n);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = OUTER_TTL;
	__builtin_memcpy(&ip6->saddr, &src, sizeof(src));
	__builtin_memcpy(&ip6->daddr, &dst, sizeof(dst));
	ic->icmp6_type = ICMPV6_PKT_TOOBIG;
	ic->icmp6_code = 0;
	ic->icmp6_cksum = 0;
	ic->icmp6_mtu = bpf_htonl(mtu);
	s = csum_addr(src.in6_u.u6_addr32, 4) + csum_addr(dst.in6_u.u6_addr32, 4) +
	    csum_pseudo_tail(IPPROTO_ICMPV6, ICMP_HLEN + n);
	ic->icmp6_cksum = ~csum_fold32(s + csum_span(ic, end));
	return 0;
}

/* Echo request -> echo reply, in place: addresses swapped (the reply comes from the VIP),
 * TTL / hop limit reset, type changed, checksums updated. The caller checked lengths. */
static __noinline int echo_reply_v4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct icmp4_hdr *ic = (void *)(ip + 1);
	__u32 a;
	__u16 old;

	if ((void *)(ic + 1) > end)
		return -1;
	swap_macs(data);
	a = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a;
	ip->ttl = OUTER_TTL;
	ip->check = 0;
	ip->check = ~csum_fold32(csum_words((const __u16 *)ip, IPV4_HLEN / 2));
	old = *(__u16 *)ic;
	ic->type = ICMP_ECHOREPLY;
	ic->checksum = csum_replace16(ic->checksum, old, *(__u16 *)ic);
	return 0;
}

static __noinline int echo_reply_v6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct icmp6hdr *ic = (void *)(ip6 + 1);
	struct in6_addr a;
	__u16 old;

	if ((void *)(ic + 1) > end)
		return -1;
	swap_macs(data);
	__builtin_memcpy(&a, &ip6->saddr, sizeof(a));
	__builtin_memcpy(&ip6->saddr, &ip6->daddr, sizeof(a));
	__builtin_memcpy(&ip6->daddr, &a, sizeof(a));
	ip6->hop_limit = OUTER_TTL;
	/* the pseudo-header sum does not change when source and destination swap */
	old = *(__u16 *)ic;
	ic->icmp6_type = ICMPV6_ECHO_REPLY;
	ic->icmp6_cksum = csum_replace16(ic->icmp6_cksum, old, *(__u16 *)ic);
	return 0;
}

#endif
