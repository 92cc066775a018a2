// SPDX-License-Identifier: GPL-2.0
/* Backend-side decapsulation for hosts without ipip/ip6_tunnel/fou: strips the outer
 * IPv4 or IPv6 header (protocol 4 or 41) or outer IP+UDP to gue_port, rewrites the
 * EtherType for the inner packet and passes it to the stack. Everything else passes
 * untouched. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"
#include "parse.h"

/* Set between open and load (network byte order). */
const volatile __u16 gue_port = 0;

enum { DECAP_SEEN, DECAP_STRIPPED, DECAP_MAX };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_stats SEC(".maps");

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&decap_stats, &idx);

	if (v)
		(*v)++;
}

/* Which inner packet follows, by the outer protocol, or 0 if not ours. For GUE the
 * first nibble of the payload is the inner IP version. */
static __always_inline __u16 inner_ethertype(int proto, void *l4, void *end, int *extra)
{
	struct udphdr *udp = l4;
	__u8 *first;

	*extra = 0;
	if (proto == IPPROTO_IPIP)
		return ETH_P_IP;
	if (proto == IPPROTO_IPV6_ENC)
		return ETH_P_IPV6;
	if (proto != IPPROTO_UDP || !gue_port)
		return 0;
	first = (void *)(udp + 1);
	if ((void *)(first + 1) > end || udp->dest != gue_port)
		return 0;
	*extra = UDP_HLEN;
	if ((*first >> 4) == 4)
		return ETH_P_IP;
	if ((*first >> 4) == 6)
		return ETH_P_IPV6;
	return 0;
}

SEC("xdp")
int xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct hdr_cursor c = { .pos = data };
	struct ethhdr *eth, saved;
	struct ipv6hdr *ip6;
	struct iphdr *ip;
	int proto, extra, outer;
	__u16 inner;

	proto = parse_eth(&c, end, &eth);
	if (proto == bpf_htons(ETH_P_IP)) {
		proto = parse_ipv4(&c, end, &ip);
		if (proto < 0 || ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF | IP_OFFMASK)))
			return XDP_PASS;
		outer = IPV4_HLEN;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		proto = parse_ipv6(&c, end, &ip6);
		if (proto < 0)
			return XDP_PASS;
		outer = IPV6_HLEN;
	} else {
		return XDP_PASS;
	}
	bump(DECAP_SEEN);
	inner = inner_ethertype(proto, c.pos, end, &extra);
	if (!inner)
		return XDP_PASS;

	__builtin_memcpy(&saved, eth, sizeof(saved));
	if (bpf_xdp_adjust_head(ctx, outer + extra))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, saved.h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_source, saved.h_source, ETH_ALEN);
	eth->h_proto = bpf_htons(inner);
	bump(DECAP_STRIPPED);
	return XDP_PASS;
}

/* For a veth end that only has to accept XDP_TX / XDP_REDIRECT frames (a veth drops them
 * unless it runs an XDP program itself): the lab's switch ports, without loading the
 * bench object. */
SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
