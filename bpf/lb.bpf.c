// SPDX-License-Identifier: GPL-2.0
/* xdplb data path entry: count, parse Ethernet, dispatch by EtherType. Everything that
 * is not for a VIP leaves with XDP_PASS, untouched. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_maps.h"
#include "flowkey.h"
#include "process.h"
#include "icmp.h"
#include "ourmac.h"

SEC("xdp")
int xdplb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct hdr_cursor c = { .pos = data };
	__u32 zero = 0, frame_len = end - data;
	struct lb_global *g = bpf_map_lookup_elem(&stats, &zero);
	struct encap_info ei = {};
	union flow_key_words fk;
	struct lb_config *cfg;
	struct ethhdr *eth;
	int proto, v, syn = 0;

	if (!g)
		return XDP_PASS;
	/* ei stays in memory, written by the parser and read at encapsulation: held in
	 * registers its fields were spilled and reloaded where the IPv4 and IPv6 parsers
	 * join, a store-to-load stall on every packet */
	asm volatile("" : : "r"(&ei));
	g->c[ST_RX]++;
	proto = parse_eth(&c, end, &eth);
	if (proto == bpf_htons(ETH_P_IP))
		v = flow_ipv4(&c, end, g, &fk, &ei, &syn);
	else if (proto == bpf_htons(ETH_P_IPV6))
		v = flow_ipv6(&c, end, g, &fk, &ei, &syn);
	else
		return verdict_pass(g);
	if (v != FLOW_KEY_READY && v != FLOW_ICMP)
		return v;
	/* (the MAC is checked only on the way to a VIP's handling: passes pay nothing) */
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg) /* cannot happen (one entry); the verifier wants the check */
		return verdict_pass(g);
	if (for_another_host(eth, cfg))
		return pass_other_host(g);
	if (v == FLOW_ICMP)
		return proto == bpf_htons(ETH_P_IP) ? lb_icmp4(ctx, g) : lb_icmp6(ctx, g);
	/* a QUIC connection ID names its backend whatever the 5-tuple: asked first */
	if (fk.k.proto == IPPROTO_UDP) {
		v = lb_quic(ctx, g, cfg, &fk.k, &ei, frame_len);
		if (v != FLOW_KEY_READY)
			return v;
	}
	/* one copy of the flow and forwarding code for both families: half the program's
	 * hot instructions, which matters when NAPI and the stack share the i-cache */
	return lb_flow(ctx, g, cfg, &fk.k, &ei, frame_len, syn);
}

char LICENSE[] SEC("license") = "GPL";
