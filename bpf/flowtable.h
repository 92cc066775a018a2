/* SPDX-License-Identifier: GPL-2.0 */
/* The connection table `flows`: one table for every CPU, so a connection's packets find
 * the same entry whatever CPU they arrive on, and nothing per CPU needs to be kept
 * coherent. Set-associative: a flow's key hashes (flow_slot_hash) to a bucket of
 * LB_FLOW_WAYS slots and to its own slot there. A lookup reads the own slot first (one
 * cache line: nearly every hit), then the bucket. A write takes, in order: the own slot
 * when it is free or holds the key already (no other slot is read); the slot that holds
 * the key; else the own slot, moving its entry onto an older copy of that entry's flow,
 * else to the bucket's free or least recently used slot (that entry is evicted), unless
 * its entry was used since the bucket's last write (then the new entry takes that slot).
 * So entries go only when their bucket is full, least recently used first, and every
 * eviction is counted.
 *
 * Concurrency, per slot, seqlock style: a writer takes the slot by turning its even seq
 * odd (compare-and-swap against the value its scan saw, so it never overwrites what
 * another CPU wrote since) and ends it even again; a reader retries a slot whose seq was
 * odd or changed across its read. A scan of the bucket checks all its seqs again at the
 * end, so an entry being moved between two slots is never missed. Loads are not
 * reordered with loads, nor stores with stores, on x86-64 (the JIT's target here): the
 * compiler barriers are all the ordering this needs. Two CPUs writing one bucket at the
 * same moment: the loser's flow is forwarded but not remembered (flow_insert_raced). */
#ifndef XDPLB_FLOWTABLE_H
#define XDPLB_FLOWTABLE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_maps.h"
#include "flowkey.h"
#include "flowhash.h"

#define FT_WAYS LB_FLOW_WAYS
#define FT_MASK (FT_WAYS - 1)
#define FT_NONE FT_WAYS /* no such slot */
#define FT_TRIES 3      /* reads of a bucket that writers keep changing */
#define FT_AGE_MAX 255

enum ft_result {
	FT_RACED = -1,  /* not written: another CPU was writing the bucket */
	FT_STORED = 0,  /* written in the flow's own slot, free or its own already */
	FT_EVICTED = 1, /* written in place of another flow's entry */
	FT_PLACED = 2,  /* written after reading the bucket (the own slot held another flow) */
};

/* A slot holds a flow when its key has an address family (a packet's key always has):
 * an all-zero slot is empty. */
static __always_inline int ft_used(const struct flow_slot *s)
{
	return s->key.family != LB_AF_NONE;
}

static __always_inline __u32 ft_seq(const struct flow_slot *s)
{
	return *(volatile const __u32 *)&s->seq;
}

/* The bucket of a flow with slot hash h (multiply-shift: any number of buckets, no
 * division), and the flow's own slot within it. */
static __always_inline __u32 ft_bucket(__u32 h)
{
	return (__u32)(((__u64)h * flow_buckets) >> 32);
}

static __always_inline __u32 ft_own(__u32 h)
{
	return h & FT_MASK;
}

static __always_inline struct flow_bucket *ft_lookup_bucket(__u32 bucket)
{
	return bpf_map_lookup_elem(&flows, &bucket);
}

static __always_inline struct flow_slot *ft_slot(struct flow_bucket *b, __u32 i)
{
	return &b->slot[i & FT_MASK];
}

/* A new flow's first step, before the ring is read: a store to its own slot's line,
 * which no reader looks at (all 8 lines of the bucket when `whole`: the table is full,
 * ft_store will read them all). The table is far bigger than the caches and the TLB, so
 * the line is nearly always in memory and its page not mapped in the TLB. A store does
 * not hold up the loads that follow it: its page walk overlaps the ring's, and its
 * fetch the ring, the encapsulation and the send, before ft_store needs the line. A
 * load there would stall this packet for all of it. */
static __always_inline void ft_prefetch(__u32 bucket, __u32 own, int whole)
{
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	__u32 i;

	if (!b)
		return;
	if (!whole) {
		*(volatile __u8 *)&ft_slot(b, own)->touch = 0;
		return;
	}
	for (i = 0; i < FT_WAYS; i++)
		*(volatile __u8 *)&b->slot[i].touch = 0;
}

/* Slot s read consistently: 1 if it holds fk (its entry in *out), 0 if it holds another
 * flow or none (an empty slot's zero key matches no packet's), -1 if a CPU wrote it
 * meanwhile. */
static __always_inline int ft_read(const struct flow_slot *s, const struct flow_key *fk,
				   struct flow_val *out)
{
	__u32 seq = ft_seq(s);
	int match;

	barrier();
	match = flow_key_eq(&s->key, fk);
	if (match)
		*out = s->val;
	barrier();
	if ((seq & 1) || ft_seq(s) != seq)
		return -1;
	return match;
}

#define FT_BUSY (~0ULL)

/* The sum of a bucket's seqs, FT_BUSY while a slot is being written. The sum changes
 * whenever a slot is written (a write only ever increases its seq), so equal sums before
 * and after a read of the bucket mean nothing was written meanwhile. */
static __always_inline __u64 ft_seq_sum(const struct flow_bucket *b)
{
	__u64 sum = 0;
	__u32 i, seq, odd = 0;

	for (i = 0; i < FT_WAYS; i++) {
		seq = ft_seq(&b->slot[i]);
		sum += seq;
		odd |= seq;
	}
	return odd & 1 ? FT_BUSY : sum;
}

/* The entry of fk, looked up in the whole bucket: its slot with *out filled, or -1 when
 * the table has none (or writers kept the bucket changing). A function of its own,
 * verified once rather than at every caller. */
__noinline int ft_find(__u32 bucket, const struct flow_key *fk, struct flow_val *out)
{
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	const struct flow_slot *s;
	__u32 t, i;
	__u64 sum;
	int found;

	if (!b || !fk || !out)
		return -1;
	for (t = 0; t < FT_TRIES; t++) {
		sum = ft_seq_sum(b);
		if (sum == FT_BUSY)
			continue;
		barrier();
		found = -1;
		for (i = 0; i < FT_WAYS; i++) {
			s = &b->slot[i];
			if (flow_key_eq(&s->key, fk)) {
				*out = s->val;
				found = i;
				break;
			}
		}
		barrier();
		if (ft_seq_sum(b) == sum)
			return found;
	}
	return -1;
}

/* What a writer needs to know of a bucket, read consistently (ft_scan). */
struct ft_scan {
	__u32 seq[FT_WAYS]; /* each slot's seq when read */
	__u32 match;        /* the slot holding the key, FT_NONE if none */
	__u32 dup;          /* a second one (two CPUs wrote the key at once), FT_NONE */
	__u32 empty;        /* an empty slot (the own one if it is), FT_NONE */
	__u32 oldest;       /* the least recently used entry of another flow, FT_NONE */
};

/* Read the bucket until no slot changed while it was read (at most FT_TRIES times).
 * 0 with *sc filled, -1 when writers kept changing it. */
static __always_inline int ft_scan(struct flow_bucket *b, __u32 own,
				   const struct flow_key *fk, struct ft_scan *sc)
{
	struct flow_slot *s;
	__u32 t, i, age, oldest_age, odd;

	for (t = 0; t < FT_TRIES; t++) {
		sc->match = sc->dup = sc->empty = sc->oldest = FT_NONE;
		oldest_age = 0;
		odd = 0;
		for (i = 0; i < FT_WAYS; i++) {
			s = &b->slot[i];
			sc->seq[i] = ft_seq(s);
			odd |= sc->seq[i];
			barrier();
			age = s->age;
			if (!ft_used(s)) {
				if (sc->empty == FT_NONE || i == own)
					sc->empty = i;
			} else if (flow_key_eq(&s->key, fk)) {
				if (sc->match == FT_NONE)
					sc->match = i;
				else
					sc->dup = i;
			} else if (sc->oldest == FT_NONE || age > oldest_age) {
				sc->oldest = i;
				oldest_age = age;
			}
		}
		if (odd & 1)
			continue;
		barrier();
		odd = 0;
		for (i = 0; i < FT_WAYS; i++)
			odd |= ft_seq(&b->slot[i]) ^ sc->seq[i];
		if (!odd)
			return 0;
	}
	return -1;
}

/* Another slot holding the flow of the own slot `own` (an older copy the fast path of
 * ft_store left), else FT_NONE. Read without checking seqs: the caller writes the slot
 * only by compare-and-swap against the seq its own scan saw, so a slot that changed
 * meanwhile is never written. A function of its own: inlined, its result would multiply
 * the states the verifier walks through ft_store. */
__noinline int ft_owndup(__u32 bucket, __u32 own)
{
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	const struct flow_slot *o;
	__u32 i;

	if (!b)
		return FT_NONE;
	o = ft_slot(b, own);
	for (i = 0; i < FT_WAYS; i++)
		if (i != (own & FT_MASK) && ft_used(&b->slot[i]) &&
		    flow_key_eq(&b->slot[i].key, &o->key))
			return i;
	return FT_NONE;
}

/* Take slot s if its seq is still `seq` (nobody wrote it since it was read). The locked
 * compare-and-swap also orders the writes that follow after it. */
static __always_inline int ft_lock(struct flow_slot *s, __u32 seq)
{
	return __sync_val_compare_and_swap(&s->seq, seq, seq + 1) == seq;
}

static __always_inline void ft_unlock(struct flow_slot *s, __u32 seq)
{
	barrier();
	*(volatile __u32 *)&s->seq = seq + 2;
}

static __always_inline void ft_put(struct flow_slot *s, const struct flow_key *fk,
				   const struct flow_val *v, __u8 age)
{
	__builtin_memcpy(&s->key, fk, sizeof(*fk));
	s->val = *v;
	s->age = age;
}

/* Remember fk -> nv (see the top of this file for where it goes); an enum ft_result. A
 * function of its own, as ft_find.
 *
 * First, reading one line only: a free own slot, or one holding fk already, is written
 * at once. The bucket is not read, so an older entry of fk may stay in another slot
 * (a connection that reuses a remembered 5-tuple); lookups read the own slot first, so
 * the new entry wins, and whoever later moves the own slot's entry out (below) moves it
 * onto that older copy, so it can never resurface. Otherwise the whole bucket is read. */
__noinline int ft_store(__u32 bucket, __u32 own, const struct flow_key *fk,
			const struct flow_val *nv)
{
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	struct flow_slot *s, *to;
	struct ft_scan sc;
	__u32 i, t = own & FT_MASK, move = FT_NONE, seq, older;
	int res;

	if (!b || !fk || !nv)
		return FT_RACED;
	s = ft_slot(b, t);
	seq = ft_seq(s);
	barrier();
	if (!(seq & 1) && (!ft_used(s) || flow_key_eq(&s->key, fk)) && ft_lock(s, seq)) {
		ft_put(s, fk, nv, 0);
		ft_unlock(s, seq);
		return FT_STORED;
	}
	res = FT_PLACED;
	if (ft_scan(b, t, fk, &sc))
		return FT_RACED;
	if (sc.match != FT_NONE) {
		t = sc.match;
	} else if (sc.empty != t) {
		/* the own slot holds another flow: the older copy of that flow, else the
		 * bucket's free slot, else its LRU entry (maybe the own one), gives way */
		older = ft_owndup(bucket, t);
		move = older < FT_WAYS ? older : sc.empty != FT_NONE ? sc.empty : sc.oldest;
		if (older >= FT_WAYS && sc.empty == FT_NONE)
			res = FT_EVICTED;
		if (!ft_slot(b, t)->age) { /* used since the bucket's last write: it stays */
			t = move;
			move = FT_NONE;
		} else if (move == t) {
			move = FT_NONE;
		}
	}
	/* the other entries grow one write older (racy increments: only an order) */
	for (i = 0; i < FT_WAYS; i++) {
		s = &b->slot[i];
		if (i != sc.match && ft_used(s) && s->age < FT_AGE_MAX)
			s->age++;
	}
	s = ft_slot(b, t);
	if (!ft_lock(s, sc.seq[t & FT_MASK]))
		return FT_RACED;
	if (move != FT_NONE) {
		to = ft_slot(b, move);
		if (!ft_lock(to, sc.seq[move & FT_MASK])) {
			ft_unlock(s, sc.seq[t & FT_MASK]);
			return FT_RACED;
		}
		ft_put(to, &s->key, &s->val, s->age);
		ft_unlock(to, sc.seq[move & FT_MASK]);
	}
	ft_put(s, fk, nv, 0);
	ft_unlock(s, sc.seq[t & FT_MASK]);
	if (sc.dup != FT_NONE) {
		s = ft_slot(b, sc.dup);
		if (ft_lock(s, sc.seq[sc.dup & FT_MASK])) {
			s->key.family = LB_AF_NONE;
			ft_unlock(s, sc.seq[sc.dup & FT_MASK]);
		}
	}
	return res;
}

/* A hit found its entry at slot `at` of its bucket, not in its own slot: swap the two
 * (both taken, so readers retry rather than miss either), so the flow's next packets
 * are found with one cache line read, unless the own slot's entry was used since the
 * bucket's last write (it stays: two busy flows with one own slot would trade places on
 * every packet; the found entry is then marked used where it is). Once per flow, on its
 * first packet after an insert put it elsewhere. */
__noinline int ft_promote(__u32 bucket, __u32 own, __u32 at)
{
	struct flow_bucket *b = ft_lookup_bucket(bucket);
	struct flow_slot *o, *a, tmp;
	__u32 so, sa;

	if (!b)
		return 0;
	o = ft_slot(b, own);
	a = ft_slot(b, at);
	if (o == a)
		return 0;
	so = ft_seq(o);
	sa = ft_seq(a);
	if (!o->age || (so | sa) & 1 || !ft_lock(o, so)) {
		if (a->age) /* it was used, wherever it stays */
			a->age = 0;
		return 0;
	}
	if (!ft_lock(a, sa)) {
		ft_unlock(o, so);
		return 0;
	}
	tmp = *o;
	ft_put(o, &a->key, &a->val, 0);
	ft_put(a, &tmp.key, &tmp.val, tmp.age);
	ft_unlock(a, sa);
	ft_unlock(o, so);
	return 1;
}

#endif
