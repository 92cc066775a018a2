// SPDX-License-Identifier: GPL-2.0
/* xdplb data path entry: count, parse Ethernet, dispatch by EtherType. Everything that
 * is not for a VIP leaves with XDP_PASS, untouched. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_maps.h"
#include "process.h"

SEC("xdp")
int xdplb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct hdr_cursor c = { .pos = data };
	__u32 zero = 0, frame_len = end - data;
	struct lb_global *g = bpf_map_lookup_elem(&stats, &zero);
	struct ethhdr *eth;
	int proto;

	if (!g)
		return XDP_PASS;
	g->c[ST_RX]++;
	proto = parse_eth(&c, end, &eth);
	if (proto == bpf_htons(ETH_P_IP))
		return process_ipv4(ctx, &c, end, g, frame_len);
	if (proto == bpf_htons(ETH_P_IPV6))
		return process_ipv6(ctx, &c, end, g, frame_len);
	return verdict_pass(g);
}

char LICENSE[] SEC("license") = "GPL";
