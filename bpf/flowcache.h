/* SPDX-License-Identifier: GPL-2.0 */
/* The per-CPU flow cache kept coherent with `flows`, whatever CPU a flow's packets
 * arrive on. A CPU's slot only ever holds what `flows` held for that key; a write of a
 * `flows` entry (a SYN, a new or moved flow) empties the slot of that key in every other
 * CPU's range, so no CPU keeps serving the entry it replaced. The hit path is untouched:
 * the writer pays: one slot read per other CPU.
 *
 * The race: CPU B reads the old entry from `flows` and fills its slot just as CPU A
 * replaces the entry and empties B's slot; B's fill could land after A's check. So A
 * bumps a per-index sequence number (flow_seq) after the write and before the check, and
 * B reads it before its table lookup and again after its fill: if it moved, B empties
 * its own slot. Each side orders its store before its load with a locked add (a full
 * barrier on x86-64): either A sees B's fill, or B sees A's bump. Two CPUs writing the
 * same key at once: each keeps its own fill only if the sequence moved by its own bump
 * alone, and each empties the other's copy if it sees it. */
#ifndef XDPLB_FLOWCACHE_H
#define XDPLB_FLOWCACHE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "flowkey.h"

static __always_inline __u32 *flow_seq_of(__u32 idx)
{
	return bpf_map_lookup_elem(&flow_seq, &idx);
}

static __always_inline __u32 seq_read(const __u32 *seq)
{
	return seq ? *(volatile const __u32 *)seq : 0;
}

static __always_inline void cache_fill(struct flow_cache_slot *cs, const struct flow_key *fk,
				       const struct flow_val *fv)
{
	if (cs) {
		__builtin_memcpy(&cs->key, fk, sizeof(*fk));
		cs->val = *fv;
	}
}

/* Fill this CPU's slot with an entry of `flows` read after the index's sequence number
 * was `seen`; leave it empty if a write happened since (the entry may be the replaced
 * one, and the writer may have checked this slot before this fill). */
static __always_inline void cache_fill_checked(struct flow_cache_slot *cs,
					       const struct flow_key *fk,
					       const struct flow_val *fv, __u32 *seq, __u32 seen)
{
	if (!cs)
		return;
	cache_fill(cs, fk, fv);
	if (!seq)
		return;
	__sync_fetch_and_add(&cs->pad, 0); /* the fill is visible before seq is read */
	if (seq_read(seq) != seen)
		cs->val.vip_id = 0;
}

/* The `flows` entry `fv` of `fk` (cache index idx) was just written, the index's
 * sequence number having been `seen` before: fill this CPU's slot with it, bump the
 * sequence (the locked add orders the write and the fill before the reads below), keep
 * the fill only if no other CPU wrote an entry of this index meanwhile (it may be the
 * newer one), and empty every other CPU's slot that holds this key. No barrier follows
 * the other CPUs' slot reads, so their cache misses overlap with the send. */
static __always_inline void cache_publish(struct flow_cache_slot *own, const struct flow_key *fk,
					  const struct flow_val *fv, __u32 idx, __u32 *seq,
					  __u32 seen)
{
	__u32 me = bpf_get_smp_processor_id(), cpu, slot;
	struct flow_cache_slot *cs;

	cache_fill(own, fk, fv);
	if (seq) {
		__sync_fetch_and_add(seq, 1);
		if (own && seq_read(seq) != seen + 1)
			own->val.vip_id = 0;
	}
	for (cpu = 0; cpu < flow_cache_cpus; cpu++) {
		if (cpu == me)
			continue;
		slot = cpu * (flow_cache_mask + 1) + idx;
		cs = bpf_map_lookup_elem(&flow_cache, &slot);
		if (!cs)
			break;
		if (cs->val.vip_id && flow_key_eq(&cs->key, fk))
			cs->val.vip_id = 0;
	}
}

#endif
