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
 * backend ids. A ring is never edited in place: user space fills a new inner map
 * completely and swaps it into this outer slot with one update, so a packet sees the
 * whole old ring or the whole new one. BPF_F_INNER_MAP lets rings of any size share
 * the outer map; a VIP whose ring changes size gets a new slot, and its vip_meta switches
 * ring id and size in one update. BPF_F_MMAPABLE
 * lets user space write a new ring with one memcpy instead of 65537 element updates. */
struct ring_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_DEFAULT_RING_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP | BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_MAX_NEXTHOPS);
	__type(key, __u32);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

/* Connection table: one hash table, one LRU list per CPU (no shared LRU lock). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LB_FLOW_TABLE_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

/* Per-CPU direct-mapped cache in front of `flows` (see struct flow_cache_slot): one
 * flat array, CPU c owning slots [c * n, (c + 1) * n) with n = flow_cache_mask + 1. Flat
 * rather than PERCPU_ARRAY: a slot is one load from a page-aligned (mmapable) array, so
 * 64-byte slots sit on cache lines, instead of a load of the element's per-CPU pointer
 * and then a slot that may straddle two lines. Not pinned: a new instance starts empty. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_FLOW_CACHE_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct flow_cache_slot);
} flow_cache SEC(".maps");

/* Per-CPU window of flow-table inserts, for lb_config.flow_insert_limit. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_rate);
} flow_rate SEC(".maps");

/* Per-CPU window of ICMP too-big answers, for lb_config.too_big_per_sec. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_rate);
} too_big_rate SEC(".maps");

/* Slots per CPU - 1 (a power of two - 1), and the number of CPU ranges (possible
 * CPUs), set between open and load. */
const volatile __u32 flow_cache_mask = LB_FLOW_CACHE_SLOTS - 1;
const volatile __u32 flow_cache_cpus = 1;

/* One sequence number per flow-cache index (shared by all CPUs): bumped by every write
 * of a `flows` entry whose key has that index, so a CPU that filled its cache slot from
 * the table while a write was under way can tell (see flowcache.h). Not pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LB_FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} flow_seq SEC(".maps");

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
 * flow_cache: CPU c's counter for VIP id i is element c * vip_stats_stride + i (the
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

#endif
