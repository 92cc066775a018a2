/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU event budgets in one-second windows (flow-table inserts, ICMP answers). */
#ifndef XDPLB_RATELIMIT_H
#define XDPLB_RATELIMIT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_consts.h"
#include "lb_structs.h"

/* This CPU's window in `map` (a one-entry PERCPU_ARRAY of struct flow_rate), a new one
 * begun if the last one's second is over; NULL if the map has no entry. Coarse clock; a
 * window starts with the first event after the previous one ended. */
static __always_inline struct flow_rate *window_now(void *map)
{
	__u32 zero = 0;
	struct flow_rate *r = bpf_map_lookup_elem(map, &zero);
	__u64 now;

	if (!r)
		return NULL;
	now = bpf_ktime_get_coarse_ns();
	if (now - r->window_start_ns >= ONE_SEC_NS) {
		r->window_start_ns = now;
		r->events = 0;
	}
	return r;
}

/* Take one event from window r; 0 when `limit` were taken already. */
static __always_inline int window_take_from(struct flow_rate *r, __u32 limit)
{
	if (!r || r->events >= limit)
		return 0;
	r->events++;
	return 1;
}

/* Take one event from this CPU's window in `map`; 0 when `limit` were taken already. */
static __always_inline int window_take(void *map, __u32 limit)
{
	return window_take_from(window_now(map), limit);
}

/* Whether window_take(map, limit) would take an event now; takes none, but brings the
 * window up to date, so a take later in the same packet can skip the clock
 * (window_take_current). */
static __always_inline int window_open(void *map, __u32 limit)
{
	struct flow_rate *r = window_now(map);

	return r && r->events < limit;
}

/* window_take for a packet that called window_open(map, ...) already: the window is
 * current, so no second clock read (a helper call per new flow). At worst a window that
 * ended in between takes one more event before the next restarts it. */
static __always_inline int window_take_current(void *map, __u32 limit)
{
	__u32 zero = 0;

	return window_take_from(bpf_map_lookup_elem(map, &zero), limit);
}

#endif
