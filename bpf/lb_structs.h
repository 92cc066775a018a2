/* SPDX-License-Identifier: GPL-2.0 */
/* Structs shared between the data path and user space. Mirrored field for field in
 * lb/layout.py (a test compares both against this object's BTF). Every struct is
 * fixed-width with explicit padding, and an all-zero value is always the safe one. */
#ifndef XDPLB_STRUCTS_H
#define XDPLB_STRUCTS_H

#include <linux/types.h>
#include "lb_consts.h"

/* Address families as stored in maps. Zero means "no address": never forwarded to. */
enum lb_family {
	LB_AF_NONE = 0,
	LB_AF_INET = 1,
	LB_AF_INET6 = 2,
};

/* Key of the `vips` map. Addresses and port are in network byte order; an IPv4 address
 * sits in addr[0] with the rest zero. Port 0 means "any port" (looked up second). */
struct vip_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 family;
};

#define VIP_F_HASH_SRC_ONLY (1u << 0)
#define VIP_F_QUIC (1u << 1) /* a UDP VIP whose QUIC short-header packets go by their CID */

/* Value of `vips`. vip_id indexes `vip_stats` and owns backends; ring_id indexes `rings`,
 * and ring_size is that ring's size: both change in one update of this value, so a VIP
 * whose ring changes size never indexes a ring with the other size. Ids start at 1; a
 * zero value (no ring, size 0) drops the VIP's traffic as "no backend". */
struct vip_meta {
	__u32 vip_id;
	__u32 flags;
	__u32 ring_size;
	__u32 ring_id;
};

/* One element of a ring (an inner map of `rings`): the backend ids of LB_RING_CHUNK
 * consecutive slots on one cache line, so slot s is element s / LB_RING_CHUNK, id
 * s % LB_RING_CHUNK. Array elements are 8-byte aligned: one id per element would take
 * twice the memory and cache. Id 0: no backend. */
struct ring_chunk {
	__u32 id[LB_RING_CHUNK];
};
_Static_assert((LB_RING_CHUNK & (LB_RING_CHUNK - 1)) == 0, "ring chunk: a power of two");
_Static_assert(sizeof(struct ring_chunk) == 64, "ring chunk: one cache line");

/* The same with 16-bit ids, used when every backend id fits (max backends <= 65536):
 * half the memory per slot, and a random slot's read still touches one cache line. Its
 * size differs from ring_chunk's on purpose: the kernel refuses an inner map of the other
 * element size in `rings`, so a ring of one format is never read as the other. After the
 * elements that hold slots comes one more, which only user space reads: the ring's size
 * as its first __u32 (0xffff is a valid id here, so padding cannot mark the end). */
struct ring_chunk16 {
	__u16 id[LB_RING_CHUNK16];
};
_Static_assert((LB_RING_CHUNK16 & (LB_RING_CHUNK16 - 1)) == 0, "ring chunk16: a power of two");
_Static_assert(sizeof(struct ring_chunk16) != sizeof(struct ring_chunk),
	       "ring chunk16: an element size of its own");

/* One slot of `vip_index`, the data path's direct-mapped copy of `vips`, written by user
 * space only: a key lives in slot vip_slot_hash(key) & vip_index_mask. A key without
 * family (all zero) marks an empty slot: no VIP's key maps here. A slot holding another
 * key sends the lookup to `vips` (keys that share a slot: it holds one of them). seq is
 * odd while user space rewrites the slot; a reader that sees it odd, or changed across
 * its read, asks `vips` too. */
struct vip_slot {
	__u32 seq;
	struct vip_key key;
	struct vip_meta meta;
};

/* Key of `vip_addrs`: every address that carries at least one VIP. Used only on the rare
 * paths (IP options, fragments, extension headers, truncated L4) to decide between "not
 * ours, pass" and "ours but unsupported, drop". */
struct addr_key {
	__u32 addr[4];
	__u8 family;
	__u8 pad[3];
};

/* Existing flows stay on this backend (it is active or draining). Without the flag
 * (maint, down, removed, or a zeroed entry) they are moved to the ring's choice. */
#define BE_F_FLOWS_STAY (1u << 0)

/* Value of `backends`, indexed by backend id (one id per VIP and backend pair, id 0 is
 * never used). A flow-table entry is honoured only if the backend's vip_id matches the
 * VIP the packet is for, so an id reused by another VIP cannot capture old flows. */
struct backend {
	__u32 addr[4];
	__u8 family;
	__u8 pad0;
	__u16 gen;        /* bumped each time the backend stops keeping flows or its id is
			   * released; a released entry (AF_NONE, no flags) keeps it, so the
			   * id's next user, even after a restart, is in a new generation */
	__u32 flags;
	__u32 vip_id;
	__u32 nexthop_id; /* into `nexthops`; 0 (or an all-zero MAC) = unresolved: drop */
};

/* Value of `nexthops`: the Ethernet destination toward a backend. */
struct nexthop {
	__u8 dmac[6];
	__u16 pad;
};

/* Key of the `flows` connection table. Same address/port conventions as vip_key. */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* A connection-table entry: the backend, the VIP it was chosen for and the backend's
 * generation then (a hit needs the backend to still belong to that VIP and to be in the
 * same generation: a flow moved away while its backend was in maint or down is never
 * sent back to it, whatever stale copy another CPU's flow cache holds), and the flow hash
 * (GUE source port, IPv6 flow label). */
struct flow_val {
	__u32 backend_id;
	__u32 vip_id;
	__u32 hash;
	__u32 gen;
};

/* One slot of the connection table `flows` (flowtable.h): a flow's key and entry, on one
 * cache line. A key without address family (all zero) marks an empty slot. seq is odd
 * while a CPU writes the slot (a reader that sees it odd, or changed across its read,
 * reads again); age counts the entries written into the slot's bucket since this one was
 * last used (saturating), so a full bucket gives up its least recently used entry. */
struct flow_slot {
	struct flow_key key;
	struct flow_val val;
	__u32 seq;
	__u8 age;
	__u8 touch; /* always 0: a new flow stores it early, so its slot's line is on its
		     * way while the ring is read (flowtable.h ft_prefetch) */
	__u8 pad[2];
};

/* One element of `flows`: a bucket, LB_FLOW_WAYS slots on consecutive cache lines (one
 * lookup reaches all of them). */
struct flow_bucket {
	struct flow_slot slot[LB_FLOW_WAYS];
};

/* Key of `quic_servers`: a QUIC VIP as packets name it (address and port as in
 * vip_key; QUIC VIPs have a port), the length of its server IDs (1..4 bytes) and one
 * server ID, in host order. */
struct quic_server_key {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 sid_len;
	__u32 server_id;
};

/* Value of `quic_servers`: the backend whose connection IDs carry that server ID. It is
 * honoured only while the backend belongs to vip_id and keeps its flows (active or
 * draining); cid_len is the length of the VIP's connection IDs (a short header carries
 * none): a datagram too short to hold one is not routed by it. Backend id 0: none. */
struct quic_server {
	__u32 backend_id;
	__u32 vip_id;
	__u8 cid_len;
	__u8 pad[3];
};

/* One slot of the per-CPU `quic_cache`, a direct-mapped cache of `quic_servers` entries
 * filled by the data path: honoured only when its key equals the packet's and its epoch
 * is the current quic_epoch (user space bumps it after changing quic_servers). An
 * all-zero slot (family 0) never matches. */
struct quic_cache_slot {
	struct quic_server_key key;
	struct quic_server val;
	__u32 epoch;
	__u64 pad[3];
};

enum lb_encap {
	LB_ENCAP_IPIP = 0, /* IPIP, IP6IP6, IPv4-in-IPv6, IPv6-in-IPv4 by families */
	LB_ENCAP_GUE = 1,  /* direct IP in UDP to gue_port */
};

enum lb_tx_mode {
	LB_TX_XDP_TX = 0,    /* back out of the ingress interface */
	LB_TX_REDIRECT = 1,  /* through `tx_port` (DEVMAP key 0) */
};

/* The one entry of `config`. mtu is the largest outer L3 packet the egress link takes;
 * zero (an unfilled config) makes every VIP packet "too big": dropped, never sent. */
struct lb_config {
	__u8 smac[6];
	__u8 encap;
	__u8 tx_mode;
	__u32 src_v4;
	__u32 src_v6[4];
	__u16 gue_port; /* network byte order */
	__u16 mtu;
	/* New connection-table entries allowed per second per CPU; beyond it a new flow is
	 * forwarded by the ring but not remembered (SYN-flood guard). 0: no limit. */
	__u32 flow_insert_limit;
	/* ICMP "fragmentation needed" / "packet too big" answers allowed per second per CPU;
	 * 0: none (a packet too big to encapsulate is only dropped). */
	__u32 too_big_per_sec;
	__u8 answer_ping; /* echo requests to a VIP address answered here; 0: passed on */
	__u8 pad;
	/* MAC of the interface the program is attached to: a VIP frame to another unicast
	 * MAC passes (ourmac.h). All zero: no check. */
	__u8 if_mac[6];
};

/* The one per-CPU entry of `flow_rate` (flow-table inserts) and of `too_big_rate` (ICMP
 * too-big answers): events in the current one-second window. */
struct flow_rate {
	__u64 window_start_ns; /* bpf_ktime_get_coarse_ns() when the window began */
	__u64 events;
};

struct lb_counters {
	__u64 packets;
	__u64 bytes;
};

/* One element of `backends`: a backend entry and one CPU's counters for it, on one cache
 * line. The map holds a copy of every entry per CPU (see lb_maps.h); user space writes
 * `be` into all of them and sums `c`. */
struct backend_slot {
	struct backend be;
	struct lb_counters c;
	__u64 pad[2];
};

/* Indexes into lb_global.c (per-CPU; user space sums). Append only. */
enum lb_stat {
	ST_RX = 0,
	ST_TX,
	ST_REDIRECT,
	ST_PASS,
	ST_DROP,
	ST_FLOW_HIT,
	ST_FLOW_MISS,
	ST_FLOW_MOVED,       /* flow-table entry pointed at an unusable backend: re-hashed */
	ST_DROP_NO_BACKEND,
	ST_DROP_MALFORMED,   /* truncated or inconsistent headers on a VIP address */
	ST_DROP_TOO_BIG,     /* encapsulated packet would exceed the egress MTU */
	ST_DROP_FRAGMENT,    /* IPv4 fragment or IPv6 fragment header to a VIP address */
	ST_DROP_IP_OPTIONS,  /* IPv4 options or IPv6 extension headers to a VIP address */
	ST_DROP_NO_NEXTHOP,  /* backend's next-hop MAC not resolved yet, or no egress port
			      * in tx_port (redirect mode) */
	ST_DROP_ADJUST_FAIL, /* bpf_xdp_adjust_head refused the headroom */
	ST_GUE_ZERO_CSUM,    /* GUE sent with UDP checksum 0: inner IPv4 UDP had none */
	ST_FLOW_CACHE_HIT,   /* flow hits found in the flow's own slot of its bucket, one cache
			      * line read (also in FLOW_HIT) */
	ST_FLOW_INSERT_LIMITED, /* packets of flows forwarded without a table entry, over
				 * lb_config.flow_insert_limit (each such packet; also in MISS/MOVED) */
	ST_ICMP_FORWARDED,   /* ICMP errors quoting a VIP flow's reply, sent to the flow's
			      * backend (also in TX/REDIRECT) */
	ST_TOO_BIG_ANSWERED, /* too big to encapsulate, answered with ICMP fragmentation
			      * needed / packet too big (also in TX) */
	ST_TOO_BIG_LIMITED,  /* too big, not answered: over lb_config.too_big_per_sec (also
			      * in DROP and DROP_TOO_BIG) */
	ST_ECHO_ANSWERED,    /* echo requests to a VIP address answered (also in TX) */
	ST_FLOW_EVICTED,     /* connection-table entries given up for a new flow's (its
			      * bucket was full: the least recently used one went) */
	ST_FLOW_INSERT_RACED, /* new flows not remembered: another CPU was writing the same
			       * bucket at that moment (also in MISS/MOVED) */
	ST_OTHER_HOST_PASSED, /* VIP frames to another host's unicast MAC, passed (also in
			       * PASS): a flooding switch delivered them here too */
	ST_QUIC_ROUTED_BY_CID, /* QUIC short-header packets sent to the backend their
				* connection ID names, before the connection table */
	ST_QUIC_FALLBACK,    /* QUIC short-header packets to a QUIC VIP not routed by their
			      * connection ID (unknown or unroutable server ID, backend not
			      * usable, truncated): balanced as UDP flows */
	ST__MAX,
};

#define LB_GLOBAL_SLOTS 32

struct lb_global {
	__u64 c[LB_GLOBAL_SLOTS];
};

#endif
