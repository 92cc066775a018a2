/* SPDX-License-Identifier: GPL-2.0 */
/* Flow-key extraction: parse an IPv4/IPv6 packet into the connection table's key and
 * the facts encapsulation needs, or decide its verdict (pass, or drop a broken packet to
 * a VIP address) when it is not a TCP/UDP flow toward a possible VIP. */
#ifndef XDPLB_FLOWKEY_H
#define XDPLB_FLOWKEY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"
#include "lb_structs.h"
#include "parse.h"
#include "encap.h"
#include "verdict.h"

/* flow_ipv4/6 return this instead of a verdict when *fk and *ei are filled: the packet
 * goes on to the connection table (lb_flow). Not an XDP action. */
#define FLOW_KEY_READY (-1)
/* ... and this for ICMP toward a possible VIP address: it goes on to lb_icmp4/6. */
#define FLOW_ICMP (-2)

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

/* Keys compared as the five 64-bit words they were written as. */
static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) |
		(x[4] ^ y[4])) == 0;
}

static __always_inline int l4_hdr_len(int proto)
{
	return proto == IPPROTO_TCP ? 20 : 8;
}

/* Parse an IPv4 packet into a flow key and encapsulation facts. Returns FLOW_KEY_READY
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
		return proto == IPPROTO_ICMP ? FLOW_ICMP : verdict_pass(g);
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
	return FLOW_KEY_READY;
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
		return proto == IPPROTO_ICMPV6 ? FLOW_ICMP : verdict_pass(g);
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
	return FLOW_KEY_READY;
}

#endif
