// SPDX-License-Identifier: GPL-2.0
/* Programs for tests and benchmarks (not part of the data path):
 *  bench_restore  writes a template frame over the test-run buffer (restoring the data
 *                 pointer first), optionally varies the source port (or, with
 *                 bench_gen_cfg set, flows as bench_gen does), and tail-calls the
 *                 program under test. BPF_PROG_TEST_RUN's `repeat` re-runs one buffer, so
 *                 without this a rewriting program measures its own output.
 *  bench_floor    MAC swap + XDP_TX: the cheapest forwarding program, the floor.
 *  bench_gen      live-frames traffic generator: template + varied flow, XDP_TX.
 *                 With map `bench_gen_cfg` set (frame_len != 0) it writes frames of
 *                 any length, varies up to 4 big-endian 16-bit fields per frame
 *                 (base + (run / div) % mod [+ cpu * cpu_step]) and keeps the IPv4
 *                 header and TCP/UDP checksums valid (configured by bench/traffic.py,
 *                 run by bench/pktlab.py).
 *  bench_sink     counts what arrives and drops it.
 *  bench_ops      calibration: `count` repetitions of one primitive (helper call, hash
 *                 lookup, LRU hash lookup, array lookup, adjust_head pair, a random
 *                 line of a big table), chosen in map `bench_ops_cfg`, so the cost of
 *                 each primitive on this machine can be read off as
 *                 (t(count) - t(0)) / count. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lb_consts.h"

#define TMPL_MAX 256

struct bench_tmpl {
	__u32 len;        /* frame length, a multiple of 8, <= TMPL_MAX */
	__u16 vary_off;   /* offset of a 16-bit field to vary per run (source port) */
	__u16 vary;       /* nonzero: write a per-run counter at vary_off */
	__u16 vary2_off;  /* second field (e.g. low half of the source address) */
	__u16 vary2;
	__u32 pad;
	__u8 data[TMPL_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_tmpl);
} bench_template SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} bench_target SEC(".maps");

enum { B_RUNS, B_FLOOR_TX, B_SINK_PKTS, B_SINK_BYTES, B_GEN, B_OPS, B_MAX };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, B_MAX);
	__type(key, __u32);
	__type(value, __u64);
} bench_stats SEC(".maps");

static __always_inline __u64 bump(__u32 idx, __u64 by)
{
	__u64 *v = bpf_map_lookup_elem(&bench_stats, &idx);

	if (!v)
		return 0;
	*v += by;
	return *v;
}

/* Move the head so the frame is `len` bytes (undoing whatever the program under test
 * did to it), then copy the template over it. Returns 0 with data and end set to the
 * frame. */
static __always_inline int put_template(struct xdp_md *ctx, const struct bench_tmpl *t,
					__u32 len, void **data, void **end)
{
	void *d = (void *)(long)ctx->data;
	void *e = (void *)(long)ctx->data_end;
	long delta = (long)(e - d) - (long)len;

	if (delta && bpf_xdp_adjust_head(ctx, (int)delta))
		return -1;
	d = (void *)(long)ctx->data;
	e = (void *)(long)ctx->data_end;
#pragma unroll
	for (int i = 0; i < TMPL_MAX / 8; i++) {
		if (i * 8 >= t->len || d + i * 8 + 8 > e)
			break;
		*(__u64 *)(d + i * 8) = *(__u64 *)(t->data + i * 8);
	}
	*data = d;
	*end = e;
	return 0;
}

/* Vary the template's frame as the template says. */
static __always_inline void vary_template(void *data, void *end, const struct bench_tmpl *t,
					  __u64 run)
{
	if (t->vary) {
		__u32 off = t->vary_off & (TMPL_MAX - 2);

		if (data + off + 2 <= end)
			*(__u16 *)(data + off) = (__u16)run;
	}
	if (t->vary2) {
		__u32 off = t->vary2_off & (TMPL_MAX - 2);

		if (data + off + 2 <= end)
			*(__u16 *)(data + off) = (__u16)(run >> 16) ^ (__u16)(run * 40503u);
	}
}

SEC("xdp")
int bench_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 tmp[ETH_ALEN];

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	bump(B_FLOOR_TX, 1);
	return XDP_TX;
}

/* --- flow generator (bench/traffic.py: its config; bench/pktlab.py: runs it) ----
 * Live-frame pages are recycled without their contents being restored, and the program
 * under test rewrites the frames it receives, so every frame gets the whole template. */
#define GEN_FIELDS 4

struct bench_gen_field {
	__u16 off;        /* even offset of a big-endian 16-bit field inside the template */
	__u8 in_ip;       /* covered by the IPv4 header checksum */
	__u8 in_l4;       /* covered by the TCP/UDP checksum (pseudo header or segment) */
	__u32 div;        /* value = base + (run / div) % mod + cpu * cpu_step */
	__u32 mod;
	__u32 base;
	__u32 cpu_step;
};

struct bench_gen_cfg {
	__u32 frame_len;  /* 0: bench_gen keeps its template-only behaviour */
	__u16 ip_csum_off;  /* offset of the IPv4 header checksum, 0: none */
	__u16 l4_csum_off;  /* offset of the TCP/UDP checksum, 0: none */
	__u8 l4_udp;      /* UDP: a computed checksum of 0 is sent as 0xffff */
	__u8 nfields;
	__u16 pad;
	struct bench_gen_field f[GEN_FIELDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_gen_cfg);
} bench_gen_cfg SEC(".maps");

static __always_inline __u32 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return s;
}

/* RFC 1624: HC' = ~(~HC + sum of (~m + m')) over the changed words. */
static __always_inline void csum_apply(void *data, void *end, __u32 off, __u32 acc, int udp)
{
	__u16 *p;
	__u32 s;

	off &= TMPL_MAX - 2;
	p = data + off;
	if ((void *)(p + 1) > end)
		return;
	s = csum_fold32((__u16)~*p + acc);
	s = (__u16)~s;
	if (udp && !s)
		s = 0xffff;
	*p = (__u16)s;
}

/* Vary the template's frame as bench_gen_cfg says. 0 on success. */
static __always_inline int vary_flows(void *data, void *end, const struct bench_tmpl *t,
				      const struct bench_gen_cfg *cfg, __u64 run)
{
	__u32 acc_ip = 0, acc_l4 = 0, cpu = 0;

	if (cfg->f[0].cpu_step | cfg->f[1].cpu_step | cfg->f[2].cpu_step | cfg->f[3].cpu_step)
		cpu = bpf_get_smp_processor_id();
#pragma unroll
	for (int i = 0; i < GEN_FIELDS; i++) {
		const struct bench_gen_field *f = &cfg->f[i];
		__u32 off, v, m = f->mod ? f->mod : 1;
		__u16 old, new;

		if (i >= cfg->nfields)
			break;
		off = f->off & (TMPL_MAX - 2);
		if (data + off + 2 > end)
			return -1;
		v = f->base + (__u32)((run / (f->div ? f->div : 1)) % m) + cpu * f->cpu_step;
		old = *(__u16 *)(t->data + off);
		new = bpf_htons((__u16)v);
		*(__u16 *)(data + off) = new;
		if (f->in_ip)
			acc_ip += (__u16)~old + new;
		if (f->in_l4)
			acc_l4 += (__u16)~old + new;
	}
	if (cfg->ip_csum_off && acc_ip)
		csum_apply(data, end, cfg->ip_csum_off, acc_ip, 0);
	if (cfg->l4_csum_off && acc_l4)
		csum_apply(data, end, cfg->l4_csum_off, acc_l4, cfg->l4_udp);
	return 0;
}

/* The frame of run `run`: varied as bench_gen_cfg says when it is set (frame_len != 0:
 * many flows, many destinations), else as the template says. 0 on success. */
static __always_inline int write_frame(struct xdp_md *ctx, __u64 run)
{
	__u32 zero = 0;
	struct bench_gen_cfg *cfg = bpf_map_lookup_elem(&bench_gen_cfg, &zero);
	struct bench_tmpl *t = bpf_map_lookup_elem(&bench_template, &zero);
	int flows = cfg && cfg->frame_len;
	void *data, *end;

	if (!t || put_template(ctx, t, flows ? cfg->frame_len : t->len, &data, &end))
		return -1;
	if (flows)
		return vary_flows(data, end, t, cfg, run);
	vary_template(data, end, t, run);
	return 0;
}

SEC("xdp")
int bench_restore(struct xdp_md *ctx)
{
	if (write_frame(ctx, bump(B_RUNS, 1)))
		return XDP_ABORTED;
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
}

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	if (write_frame(ctx, bump(B_GEN, 1)))
		return XDP_ABORTED;
	return XDP_TX;
}

SEC("xdp")
int bench_sink(struct xdp_md *ctx)
{
	bump(B_SINK_PKTS, 1);
	bump(B_SINK_BYTES, ctx->data_end - ctx->data);
	return XDP_DROP;
}

/* --- calibration ------------------------------------------------------------------ */
enum { OP_NONE, OP_HELPER, OP_HASH20, OP_LRU40, OP_ARRAY, OP_ADJUST, OP_LRU40_INSERT,
       OP_RING, OP_LRU40_REWRITE, OP_HASH20_INSERT, OP_SPINLOCK, OP_BIG_READ, OP_MAX };
#define OPS_MAX 64
#define OPS_KEYS 64

struct bench_ops_cfg {
	__u32 op;
	__u32 count;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_ops_cfg);
} bench_ops_cfg SEC(".maps");

/* Same key sizes as lb's `vips` (20 bytes) and `flows` (40 bytes), same map types. */
struct key20 { __u32 w[5]; };
struct key40 { __u32 w[10]; };

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024); /* user space resizes it for inserts */
	__type(key, struct key20);
	__type(value, __u64);
} bench_h20 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024); /* user space resizes it for inserts */
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct key40);
	__type(value, __u64);
} bench_lru40 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, OPS_KEYS);
	__type(key, __u32);
	__type(value, __u64);
} bench_arr SEC(".maps");

/* bpf_spin_lock saves and restores interrupts like the hash maps' bucket locks do. */
struct locked {
	struct bpf_spin_lock lock;
	__u64 v;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct locked);
} bench_lock SEC(".maps");

/* Like lb's `rings`: an array of maps whose inner array is looked up through the helper. */
struct bench_ring_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65537);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct bench_ring_inner);
} bench_rings SEC(".maps");

/* A table as big as lb's `flows` (user space sizes it and fills it with one random
 * cycle): each line names the next one to read, so every read waits for the one before,
 * as a packet's first read of its flow's slot waits for memory. */
struct bench_line {
	__u32 next;
	__u32 pad[15];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* user space resizes it */
	__type(key, __u32);
	__type(value, struct bench_line);
} bench_big SEC(".maps");

__u32 big_pos; /* where the cycle goes on from, across runs */

SEC("xdp")
int bench_ops(struct xdp_md *ctx)
{
	__u32 zero = 0, op, n;
	struct bench_ops_cfg *cfg = bpf_map_lookup_elem(&bench_ops_cfg, &zero);
	struct key20 k20 = {};
	struct key40 k40 = {}, knew = {};
	__u64 acc = 0, *v, run = bump(B_OPS, 1);
	__u32 *slot;
	void *ring;

	if (!cfg)
		return XDP_ABORTED;
	op = cfg->op;
	n = cfg->count;
	knew.w[1] = (__u32)run;         /* a new key per run and op for the inserts */
	knew.w[2] = (__u32)(run >> 32);
	for (__u32 i = 0; i < OPS_MAX && i < n; i++) {
		__u32 key = i & (OPS_KEYS - 1);

		switch (op) {
		case OP_HELPER:
			acc += bpf_get_prandom_u32();
			break;
		case OP_HASH20:
			k20.w[0] = key;
			v = bpf_map_lookup_elem(&bench_h20, &k20);
			acc += v ? *v : 0;
			break;
		case OP_LRU40:
			k40.w[0] = key;
			v = bpf_map_lookup_elem(&bench_lru40, &k40);
			acc += v ? *v : 0;
			break;
		case OP_ARRAY:
			v = bpf_map_lookup_elem(&bench_arr, &key);
			acc += v ? *v : 0;
			break;
		case OP_LRU40_INSERT:
			knew.w[0] = i;
			bpf_map_update_elem(&bench_lru40, &knew, &acc, BPF_ANY);
			break;
		case OP_LRU40_REWRITE: /* update of an existing key: same work minus the new bucket */
			k40.w[0] = key;
			bpf_map_update_elem(&bench_lru40, &k40, &acc, BPF_ANY);
			break;
		case OP_HASH20_INSERT: /* plain preallocated hash, new keys */
			k20.w[0] = i;
			k20.w[1] = (__u32)run;
			k20.w[2] = (__u32)(run >> 32);
			bpf_map_update_elem(&bench_h20, &k20, &acc, BPF_ANY);
			break;
		case OP_SPINLOCK: {
			struct locked *l = bpf_map_lookup_elem(&bench_lock, &zero);

			if (!l)
				return XDP_ABORTED;
			bpf_spin_lock(&l->lock);
			l->v++;
			bpf_spin_unlock(&l->lock);
			break;
		}
		case OP_RING:
			ring = bpf_map_lookup_elem(&bench_rings, &zero);
			if (!ring)
				return XDP_ABORTED;
			key = (i * 1031) % 65537;
			slot = bpf_map_lookup_elem(ring, &key);
			acc += slot ? *slot : 0;
			break;
		case OP_BIG_READ: {
			struct bench_line *l = bpf_map_lookup_elem(&bench_big, &big_pos);

			if (!l)
				return XDP_ABORTED;
			big_pos = l->next;
			break;
		}
		case OP_ADJUST:
			if (bpf_xdp_adjust_head(ctx, -20) || bpf_xdp_adjust_head(ctx, 20))
				return XDP_ABORTED;
			break;
		}
	}
	return acc == 0x5a5a5a5a5a5a ? XDP_PASS : XDP_DROP; /* keeps acc alive */
}

char LICENSE[] SEC("license") = "GPL";
