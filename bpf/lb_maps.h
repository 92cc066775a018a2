/* SPDX-License-Identifier: GPL-2.0 */
/* Maps of the xdplb data path. Sizes are defaults: user space resizes them between
 * open and load, and pins every map so a restarted daemon can adopt them. */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_consts.h"
#include "lb_structs.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, struct vip_meta);
} vips SEC(".maps");

/* `vips` as a direct-mapped array (struct vip_slot), so that most VIP lookups are an
 * inlined array read and a key compare instead of a helper call that hashes the key and
 * walks a bucket. User space sizes it (a power of two) and writes it beside `vips`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_VIP_INDEX_SLOTS);
	__type(key, __u32);
	__type(value, struct vip_slot);
} vip_index SEC(".maps");

/* vip_index's max_entries - 1, set between open and load. */
const volatile __u32 vip_index_mask = LB_VIP_INDEX_SLOTS - 1;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_VIPS);
	__type(key, struct addr_key);
	__type(value, __u32);
} vip_addrs SEC(".maps");

/* A 65536-bit filter over VIP destination addresses: a clear bit proves the packet is
 * not for a VIP, so non-VIP traffic passes after one inlined array read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_PREFILTER_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} prefilter SEC(".maps");

/* Maglev rings. One inner array per VIP, indexed by flow hash % ring size, holding
 * backend ids LB_RING_CHUNK to an element (struct ring_chunk), or LB_RING_CHUNK16 16-bit
 * ids (struct ring_chunk16) when ring_ids16 is set. A ring is never edited in
 * place: user space fills a new inner map completely and swaps it into this outer slot
 * with one update, so a packet sees the whole old ring or the whole new one.
 * BPF_F_INNER_MAP lets rings of any size share the outer map; a VIP whose ring changes
 * size gets a new slot, and its vip_meta switches ring id and size in one update.
 * BPF_F_MMAPABLE lets user space write a new ring with one memcpy instead of 4097
 * element updates. The value size is set between open and load with ring_ids16 (so the
 * template carries no BTF value type: it would not match the other size). */
struct ring_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, (LB_DEFAULT_RING_SIZE + LB_RING_CHUNK - 1) / LB_RING_CHUNK);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__uint(value_size, sizeof(struct ring_chunk));
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2 * LB_MAX_VIPS); /* a VIP changing ring size briefly holds two */
	__type(key, __u32);
	__array(values, struct ring_inner);
} rings SEC(".maps");

/* Backends, a copy per CPU with that CPU's counters beside each entry (struct
 * backend_slot): CPU c's slot for id i is element c * backends_stride + i. One cache line
 * per packet for the entry and its counters; only CPU c writes its counters. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_BACKENDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct backend_slot);
} backends SEC(".maps");

/* Backend ids per CPU copy (max backends), set between open and load. */
const volatile __u32 backends_stride = LB_MAX_BACKENDS;

/* Rings hold struct ring_chunk16 elements (16-bit ids), set between open and load when
 * every backend id fits 16 bits; 0: struct ring_chunk. */
const volatile __u32 ring_ids16 = 0;

/* Never read: BTF names a type only when a map or a global does, and the ring template
 * has no value type (above); tests/test_layout.py checks both layouts through these. */
const struct ring_chunk *const ring_chunk_btf = 0;
const struct ring_chunk16 *const ring_chunk16_btf = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_NEXTHOPS);
	__type(key, __u32);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

/* Connection table: one table shared by every CPU (a connection's packets may arrive on
 * any of them), set-associative: an element is a bucket of LB_FLOW_WAYS slots, a slot per
 * cache line, written and aged by the data path itself (flowtable.h). An array: a lookup
 * is an inlined read, an insert a few stores, with no allocation, lock or helper call.
 * BPF_F_MMAPABLE: page-aligned, so slots sit on cache lines, and user space reads it
 * through an mmap. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_FLOW_TABLE_SIZE / LB_FLOW_WAYS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_bucket);
} flows SEC(".maps");

/* Buckets in `flows` (its max_entries), set between open and load. */
const volatile __u32 flow_buckets = LB_FLOW_TABLE_SIZE / LB_FLOW_WAYS;

/* Per-CPU window of flow-table inserts, for lb_config.flow_insert_limit. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_rate);
} flow_rate SEC(".maps");

/* Per CPU, one bit per insert of its last 8 (the newest in bit 0): set when the flow's
 * own slot held another flow, so the whole bucket was read. All 8 set: the table is
 * full here, and a new flow's first step fetches its whole bucket (flowtable.h
 * ft_prefetch). A hint about the shared table, never a truth about it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ft_busy SEC(".maps");

/* Per-CPU window of ICMP too-big answers, for lb_config.too_big_per_sec. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_rate);
} too_big_rate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tx_port SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_global);
} stats SEC(".maps");

/* Per-VIP counters of the packets for a VIP that were not sent (dropped); a sent packet
 * is counted for its backend only, and user space adds a VIP's backends to it, so a
 * forwarded packet touches one counter line, not two. Per CPU, laid out flat like
 * backends: CPU c's counter for VIP id i is element c * vip_stats_stride + i (the
 * stride is max VIPs, set between open and load). User space sizes the map for one block
 * more than there are CPUs: the last block holds what removed backends had counted,
 * written by user space only. Only CPU c writes its block, so increments are exact. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_VIPS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct lb_counters);
} vip_stats SEC(".maps");

const volatile __u32 vip_stats_stride = LB_MAX_VIPS;

/* QUIC VIPs' server IDs -> backends (see quic.h). Sized like `backends` (one entry per
 * VIP/backend pair at most) but not preallocated: it costs memory only for QUIC VIPs. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LB_MAX_QUIC_SERVERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct quic_server_key);
	__type(value, struct quic_server);
} quic_servers SEC(".maps");

/* Per-CPU direct-mapped cache in front of quic_servers (struct quic_cache_slot), laid
 * out like flow_cache: CPU c owns slots [c * LB_QUIC_CACHE_SLOTS, (c + 1) * ...). Only
 * the data path writes it, each CPU its own range. Not pinned: a new instance starts
 * empty. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_QUIC_CACHE_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct quic_cache_slot);
} quic_cache SEC(".maps");

/* The epoch of quic_cache entries: user space bumps it after each change of
 * quic_servers, so no CPU keeps serving an entry it cached before. Pinned and adopted
 * with quic_servers: a program a restarted daemon has not replaced yet (its data path
 * kept on exit) sees the new daemon's bumps too. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} quic_epoch SEC(".maps");

/* Which QUIC server-ID lengths a QUIC VIP hashing to an index may use: four bits (bit
 * L-1: length L) per index of quic_filter_index(), sixteen indexes a word. All zero for
 * a UDP packet no QUIC VIP can be for, so such packets pay one inlined array read. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_QUIC_FILTER_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} quic_filter SEC(".maps");

#endif
