/* SPDX-License-Identifier: GPL-2.0 */
/* How a packet leaves, and what is counted for it: the global verdict counters, the
 * per-VIP counters of packets that were not sent. */
#ifndef XDPLB_VERDICT_H
#define XDPLB_VERDICT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "select.h"

/* This CPU's counter `idx` of a flat per-CPU counter map (see vip_stats). */
static __always_inline void count(void *map, __u32 stride, __u32 idx, __u32 bytes)
{
	struct lb_counters *c;
	__u32 key;

	if (idx >= stride)
		return;
	key = bpf_get_smp_processor_id() * stride + idx;
	c = bpf_map_lookup_elem(map, &key);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline int verdict_pass(struct lb_global *g)
{
	g->c[ST_PASS]++;
	return XDP_PASS;
}

static __always_inline int verdict_drop(struct lb_global *g, int reason)
{
	g->c[ST_DROP]++;
	if (reason > 0 && reason < LB_GLOBAL_SLOTS)
		g->c[reason]++;
	return XDP_DROP;
}

/* Unsupported or broken packet on a VIP address: ours to drop. Anything else: pass. */
static __always_inline int drop_if_vip(struct lb_global *g, const __u32 *addr, __u8 family,
				       int reason)
{
	if (addr_is_vip(addr, family))
		return verdict_drop(g, reason);
	return verdict_pass(g);
}

/* A VIP packet that is not sent: counted for its VIP (a sent one is counted for its
 * backend only; user space adds a VIP's backends to its own counter). */
static __always_inline int vip_drop(struct lb_global *g, __u32 vip_id, __u32 frame_len,
				    int reason)
{
	count(&vip_stats, vip_stats_stride, vip_id, frame_len);
	return verdict_drop(g, reason);
}

#endif
