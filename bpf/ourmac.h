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
 * frames for a VIP address, so other traffic pays nothing. eth: the frame's Ethernet
 * header, already bounds-checked by parse_eth. */
static __always_inline int for_another_host(const struct ethhdr *eth,
					    const struct lb_config *cfg)
{
	const __u16 *dst = (const __u16 *)eth->h_dest, *mac = (const __u16 *)cfg->if_mac;
	__u16 a, b, c;

	if (eth->h_dest[0] & 1)
		return 0; /* group bit: broadcast, multicast */
	a = mac[0];
	b = mac[1];
	c = mac[2];
	if (!(a | b | c)) /* not configured */
		return 0;
	return (a ^ dst[0]) | (b ^ dst[1]) | (c ^ dst[2]);
}

static __always_inline int pass_other_host(struct lb_global *g)
{
	g->c[ST_OTHER_HOST_PASSED]++;
	return verdict_pass(g);
}

#endif
