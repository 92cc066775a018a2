/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU event budgets in one-second windows (flow-table inserts, ICMP answers). */
#ifndef XDPLB_RATELIMIT_H
#define XDPLB_RATELIMIT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_consts.h"
#include "lb_structs.h"

/* Take one event from this CPU's window in `map` (a one-entry PERCPU_ARRAY of struct
 * flow_rate); 0 when `limit` events were taken already. Coarse clock; a window starts
 * with the first event after the previous one ended. */
static __always_inline int window_take(void *map, __u32 limit)
{
	__u32 zero = 0;
	struct flow_rate *r = bpf_map_lookup_elem(map, &zero);
	__u64 now;

	if (!r)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	if (now - r->window_start_ns >= ONE_SEC_NS) {
		r->window_start_ns = now;
		r->events = 0;
	}
	if (r->events >= limit)
		return 0;
	r->events++;
	return 1;
}

/* Whether window_take(map, limit) would take an event now; takes none. */
static __always_inline int window_open(void *map, __u32 limit)
{
	__u32 zero = 0;
	struct flow_rate *r = bpf_map_lookup_elem(map, &zero);

	if (!r)
		return 0;
	return r->events < limit ||
	       bpf_ktime_get_coarse_ns() - r->window_start_ns >= ONE_SEC_NS;
}

#endif
