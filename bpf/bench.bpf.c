// SPDX-License-Identifier: GPL-2.0
/* Programs for tests and benchmarks (not part of the data path):
 *  bench_restore  writes a template frame over the test-run buffer (restoring the data
 *                 pointer first), optionally varies the source port, and tail-calls the
 *                 program under test. BPF_PROG_TEST_RUN's `repeat` re-runs one buffer, so
 *                 without this a rewriting program measures its own output.
 *  bench_floor    MAC swap + XDP_TX: the cheapest forwarding program, the floor.
 *  bench_gen      live-frames traffic generator: template + varied flow, XDP_TX.
 *  bench_sink     counts what arrives and drops it.
 *  xdp_pass       XDP_PASS only: lets a veth peer receive XDP_TX/REDIRECT frames. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
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

enum { B_RUNS, B_FLOOR_TX, B_SINK_PKTS, B_SINK_BYTES, B_GEN, B_MAX };

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

/* Copy the template over the frame; returns 0 on success. */
static __always_inline int write_template(struct xdp_md *ctx, __u64 run)
{
	__u32 zero = 0;
	struct bench_tmpl *t = bpf_map_lookup_elem(&bench_template, &zero);
	void *data, *end;
	long delta;

	if (!t)
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	delta = (long)(end - data) - (long)t->len;
	if (delta && bpf_xdp_adjust_head(ctx, (int)delta))
		return -1;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
#pragma unroll
	for (int i = 0; i < TMPL_MAX / 8; i++) {
		if (i * 8 >= t->len || data + i * 8 + 8 > end)
			break;
		*(__u64 *)(data + i * 8) = *(__u64 *)(t->data + i * 8);
	}
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
	return 0;
}

SEC("xdp")
int bench_restore(struct xdp_md *ctx)
{
	__u64 run = bump(B_RUNS, 1);

	if (write_template(ctx, run))
		return XDP_ABORTED;
	bpf_tail_call(ctx, &bench_target, 0);
	return XDP_ABORTED;
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

SEC("xdp")
int bench_gen(struct xdp_md *ctx)
{
	__u64 run = bump(B_GEN, 1);

	if (write_template(ctx, run))
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

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
