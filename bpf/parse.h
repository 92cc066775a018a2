/* SPDX-License-Identifier: GPL-2.0 */
/* Header parsing with a cursor: each parser bounds-checks its header, advances the
 * cursor past it and returns the next protocol (or -1 when the header is truncated). */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"

struct hdr_cursor {
	void *pos;
};

/* Returns the EtherType in network byte order, or -1. */
static __always_inline int parse_eth(struct hdr_cursor *c, void *end, struct ethhdr **eth)
{
	struct ethhdr *h = c->pos;

	if ((void *)(h + 1) > end)
		return -1;
	c->pos = h + 1;
	*eth = h;
	return h->h_proto;
}

/* Fixed IPv4 header only; the caller checks ihl and fragmentation. */
static __always_inline int parse_ipv4(struct hdr_cursor *c, void *end, struct iphdr **ip)
{
	struct iphdr *h = c->pos;

	if ((void *)(h + 1) > end)
		return -1;
	c->pos = h + 1;
	*ip = h;
	return h->protocol;
}

static __always_inline int parse_ipv6(struct hdr_cursor *c, void *end, struct ipv6hdr **ip6)
{
	struct ipv6hdr *h = c->pos;

	if ((void *)(h + 1) > end)
		return -1;
	c->pos = h + 1;
	*ip6 = h;
	return h->nexthdr;
}

/* TCP and UDP both start with source and destination port: that is all we need. */
struct l4_ports {
	__be16 source;
	__be16 dest;
};

static __always_inline int parse_ports(struct hdr_cursor *c, void *end, int proto,
				       struct l4_ports **ports)
{
	void *h = c->pos;
	int len = proto == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);

	if (h + len > end)
		return -1;
	c->pos = h + len;
	*ports = h;
	return 0;
}

#endif
