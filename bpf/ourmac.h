/* SPDX-License-Identifier: GPL-2.0 */
/* Frames for another host. A switch that floods (its MAC table has aged out, or a
 * fleet shares a segment) delivers frames meant for another node here too; forwarding
 * them would hand backends a second copy of each packet. Only frames to this
 * interface's MAC (lb_config.if_mac), broadcast or multicast are ours. */
#ifndef XDPLB_OURMAC_H
#define XDPLB_OURMAC_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "verdict.h"

/* Non-zero when the frame's destination is another host's unicast MAC. Asked only of
 * frames for a VIP address, so other traffic pays nothing. */
static __always_inline int for_another_host(struct xdp_md *ctx)
{
	const __u8 *dst = (const __u8 *)(long)ctx->data;
	__u32 zero = 0;
	struct lb_config *cfg;
	__u16 a, b, c;

	if ((void *)(dst + ETH_HLEN) > (void *)(long)ctx->data_end || (dst[0] & 1))
		return 0; /* (too short was passed before; group bit: broadcast, multicast) */
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return 0;
	a = *(const __u16 *)&cfg->if_mac[0];
	b = *(const __u16 *)&cfg->if_mac[2];
	c = *(const __u16 *)&cfg->if_mac[4];
	if (!(a | b | c)) /* not configured */
		return 0;
	return (a ^ *(const __u16 *)&dst[0]) | (b ^ *(const __u16 *)&dst[2]) |
	       (c ^ *(const __u16 *)&dst[4]);
}

static __always_inline int pass_other_host(struct lb_global *g)
{
	g->c[ST_OTHER_HOST_PASSED]++;
	return verdict_pass(g);
}

#endif
