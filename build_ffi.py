"""Build the BPF objects, their skeletons, and the cffi extension `lb._native`.

clang compiles bpf/*.bpf.c (-g -O2 -target bpf), `bpftool gen skeleton` embeds each object
in a header, and cffi's API mode compiles one extension that includes the skeletons and
links libbpf dynamically. Python never parses ELF: it opens, sizes, loads and attaches
through the skeleton and libbpf, and finds maps and programs by name.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent
BPF_DIR = ROOT / "bpf"
OUT_DIR = ROOT / "build" / "bpf"
# Every BPF object and the skeleton name it gets (functions `<name>__open` etc.).
OBJECTS = {"lb": "lb_bpf", "decap": "decap_bpf", "bench": "bench_bpf"}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError:
        sys.exit(f"build_ffi: {cmd[0]} not found (install clang, llvm and bpftool: make deps)")
    except subprocess.CalledProcessError as e:
        sys.exit(f"build_ffi: {' '.join(cmd)} failed with exit code {e.returncode}")


def _arch_include() -> str:
    try:
        triple = subprocess.run(["gcc", "-dumpmachine"], check=True, capture_output=True,
                                text=True).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError):
        triple = f"{os.uname().machine}-linux-gnu"
    return f"/usr/include/{triple}"


def build_bpf() -> None:
    """bpf/NAME.bpf.c -> build/bpf/NAME.bpf.o -> build/bpf/NAME.skel.h."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    clang = os.environ.get("CLANG", "clang")
    bpftool = os.environ.get("BPFTOOL") or shutil.which("bpftool") or "/usr/sbin/bpftool"
    for src_name, skel_name in OBJECTS.items():
        src = BPF_DIR / f"{src_name}.bpf.c"
        obj = OUT_DIR / f"{src_name}.bpf.o"
        _run([clang, "-g", "-O2", "-target", "bpf", "-Wall", "-Werror",
              f"-I{_arch_include()}", f"-I{BPF_DIR}", "-c", str(src), "-o", str(obj)])
        skel = _run([bpftool, "gen", "skeleton", str(obj), "name", skel_name],
                    capture_output=True).stdout
        (OUT_DIR / f"{src_name}.skel.h").write_bytes(skel)


CDEF_SKELETONS = "".join(
    f"""
struct {skel} {{ struct bpf_object *obj; ...; }};
struct {skel} *{skel}__open(void);
int {skel}__load(struct {skel} *s);
void {skel}__destroy(struct {skel} *s);
"""
    for skel in OBJECTS.values()
)

CDEF = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;

struct bpf_object;
struct bpf_map;
struct bpf_program;

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    __u32 cpu;
    __u32 batch_size;
    ...;
};

struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; ...; };
struct bpf_xdp_query_opts { size_t sz; __u32 prog_id; __u32 drv_prog_id; __u32 hw_prog_id;
                            __u32 skb_prog_id; __u8 attach_mode; ...; };
struct bpf_map_batch_opts { size_t sz; __u64 elem_flags; __u64 flags; ...; };
struct bpf_map_create_opts { size_t sz; __u32 btf_fd; __u32 btf_key_type_id;
                             __u32 btf_value_type_id; __u32 btf_vmlinux_value_type_id;
                             __u32 inner_map_fd; __u32 map_flags; __u64 map_extra;
                             __u32 numa_node; __u32 map_ifindex; ...; };
struct bpf_map_info { __u32 type; __u32 id; __u32 key_size; __u32 value_size;
                      __u32 max_entries; __u32 map_flags; char name[16]; ...; };
struct bpf_prog_info { __u32 type; __u32 id; ...; };

struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj,
                                                     const char *name);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
__u32 bpf_map__max_entries(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__map_flags(const struct bpf_map *map);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
struct bpf_map *bpf_map__inner_map(struct bpf_map *map);
int bpf_program__fd(const struct bpf_program *prog);

int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_update_batch(int fd, const void *keys, const void *values, __u32 *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys,
                         void *values, __u32 *count, const struct bpf_map_batch_opts *opts);
int bpf_map_create(int map_type, const char *map_name, __u32 key_size, __u32 value_size,
                   __u32 max_entries, const struct bpf_map_create_opts *opts);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_map_get_fd_by_id(__u32 id);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_detach(int ifindex, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_query(int ifindex, int flags, struct bpf_xdp_query_opts *opts);
int libbpf_num_possible_cpus(void);

#define XDP_FLAGS_UPDATE_IF_NOEXIST ...
#define XDP_FLAGS_SKB_MODE ...
#define XDP_FLAGS_DRV_MODE ...
#define XDP_FLAGS_REPLACE ...
#define BPF_F_TEST_XDP_LIVE_FRAMES ...
#define BPF_F_INNER_MAP ...
#define BPF_F_MMAPABLE ...
#define BPF_ANY ...
#define BPF_NOEXIST ...
#define BPF_EXIST ...

/* extension helpers (C, below) */
void xdplb_log_capture(int on);
const char *xdplb_log_text(void);
int xdplb_decap_set_gue_port(struct decap_bpf *s, uint16_t port_be);
int xdplb_lb_set_flow_cache_mask(struct lb_bpf *s, uint32_t mask);
int xdplb_lb_set_strides(struct lb_bpf *s, uint32_t vips, uint32_t backends);
int xdplb_maglev_build(uint32_t ring_size, uint32_t n, const uint32_t *keys,
                       uint32_t key_words, const uint64_t *weights, const uint32_t *ids,
                       uint32_t *table);
void xdplb_maglev_perms(uint32_t ring_size, uint32_t n, const uint32_t *keys,
                        uint32_t key_words, uint32_t seed_offset, uint32_t seed_skip,
                        uint32_t *offsets, uint32_t *skips);
"""

SOURCE = """
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>
#include "lb.skel.h"
#include "decap.skel.h"
#include "bench.skel.h"

/* libbpf's messages (the verifier log among them) go to a buffer while capture is on,
 * so a load failure can be reported with its log instead of on stderr. */
static char log_buf[1 << 20];
static size_t log_len;
static int log_on;

static int log_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    int n;
    if (!log_on || level == LIBBPF_DEBUG)
        return 0;
    if (log_len >= sizeof(log_buf) - 1)
        return 0;
    n = vsnprintf(log_buf + log_len, sizeof(log_buf) - log_len, fmt, ap);
    if (n > 0)
        log_len += (size_t)n < sizeof(log_buf) - log_len ? (size_t)n : sizeof(log_buf) - log_len - 1;
    return 0;
}

void xdplb_log_capture(int on)
{
    libbpf_set_print(log_print);
    log_on = on;
    log_len = 0;
    log_buf[0] = 0;
}

const char *xdplb_log_text(void)
{
    return log_buf;
}

int xdplb_lb_set_flow_cache_mask(struct lb_bpf *s, uint32_t mask)
{
    if (!s || !s->rodata)
        return -EINVAL;
    s->rodata->flow_cache_mask = mask;
    return 0;
}

int xdplb_lb_set_strides(struct lb_bpf *s, uint32_t vips, uint32_t backends)
{
    if (!s || !s->rodata)
        return -EINVAL;
    s->rodata->vip_stats_stride = vips;
    s->rodata->backends_stride = backends;
    return 0;
}

int xdplb_decap_set_gue_port(struct decap_bpf *s, uint16_t port_be)
{
    if (!s || !s->rodata)
        return -EINVAL;
    s->rodata->gue_port = port_be;
    return 0;
}

/* Weighted Maglev build; lb/maglev.py holds the readable reference and the
 * explanation. Turns come in rounds r = 1, 2, ...: in round r a backend of weight w gets
 * a turn when floor(r*w/W) > floor((r-1)*w/W), W the largest weight, in index order,
 * until it reaches its quota. A turn takes the backend's next preferred empty slot.
 * Occupancy is tracked in a bitmap (8 KiB for M = 65537, in L1) rather than in the
 * 256 KiB table, since probing dominates. table[] receives ids[b] (never 0); 0 marks a
 * slot no backend took. */
#define SEED_OFFSET 0x2C6B7A31u
#define SEED_SKIP 0x7F4A7C15u

static inline uint32_t mg_rotl(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

static uint32_t mg_murmur(const uint32_t *w, uint32_t n, uint32_t h)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = w[i] * 0xcc9e2d51u;
        k = mg_rotl(k, 15) * 0x1b873593u;
        h ^= k;
        h = mg_rotl(h, 13) * 5 + 0xe6546b64u;
    }
    h ^= n * 4;
    h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
    return h;
}

/* keys: n keys of key_words u32 each; same permutation as lb/maglev.py:permutation */
void xdplb_maglev_perms(uint32_t M, uint32_t n, const uint32_t *keys, uint32_t key_words,
                        uint32_t seed_offset, uint32_t seed_skip, uint32_t *offsets,
                        uint32_t *skips)
{
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t *k = keys + (size_t)i * key_words;
        offsets[i] = mg_murmur(k, key_words, seed_offset) % M;
        skips[i] = mg_murmur(k, key_words, seed_skip) % (M - 1) + 1;
    }
}

/* Largest-remainder quotas: q[i] = floor(M*w/sum) plus one for the largest remainders
 * (ties to lower index), as lb/maglev.py:quotas. */
struct mg_rem { uint64_t rem; uint32_t i; };

static int mg_rem_cmp(const void *a, const void *b)
{
    const struct mg_rem *x = a, *y = b;
    if (x->rem != y->rem)
        return x->rem > y->rem ? -1 : 1;
    return x->i < y->i ? -1 : (x->i > y->i);
}

static int mg_quotas(uint32_t M, uint32_t n, const uint64_t *w, uint32_t *q)
{
    unsigned __int128 total = 0;
    uint64_t given = 0;
    struct mg_rem *r;
    uint32_t i, nr = 0;

    for (i = 0; i < n; i++)
        total += w[i];
    if (!total) {
        memset(q, 0, n * sizeof(*q));
        return 0;
    }
    r = calloc(n ? n : 1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    for (i = 0; i < n; i++) {
        unsigned __int128 p = (unsigned __int128)M * w[i];
        q[i] = (uint32_t)(p / total);
        given += q[i];
        if (w[i])
            r[nr++] = (struct mg_rem){ (uint64_t)(p % total), i };
    }
    qsort(r, nr, sizeof(*r), mg_rem_cmp);
    for (i = 0; i < nr && given < M; i++, given++)
        q[r[i].i]++;
    free(r);
    return 0;
}

static void mg_down(uint64_t *h, uint32_t n, uint32_t k)
{
    for (;;) {
        uint32_t l = 2 * k + 1, r = l + 1, m = k;
        if (l < n && h[l] < h[m]) m = l;
        if (r < n && h[r] < h[m]) m = r;
        if (m == k) return;
        uint64_t t = h[k]; h[k] = h[m]; h[m] = t;
        k = m;
    }
}

/* The backend's k-th turn (k >= 1) comes in round ceil(k * wmax / w). */
static inline uint64_t mg_round(uint64_t k, uint64_t w, uint64_t wmax)
{
    return (k * wmax + w - 1) / w;
}

int xdplb_maglev_build(uint32_t M, uint32_t n, const uint32_t *keys, uint32_t key_words,
                       const uint64_t *weights, const uint32_t *ids, uint32_t *table)
{
    uint32_t *offsets = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *skips = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *quotas = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *taken = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *live = calloc(n ? n : 1, sizeof(uint32_t));
    uint64_t *heap = calloc(n ? n : 1, sizeof(uint64_t));
    uint64_t *used = calloc(M / 64 + 1, sizeof(uint64_t));
    uint32_t nl = 0, filled = 0, i, equal = 1;
    uint64_t wmax = 0;
    int ret = -ENOMEM;

    if (!offsets || !skips || !quotas || !taken || !live || !heap || !used || M < 2)
        goto out;
    xdplb_maglev_perms(M, n, keys, key_words, SEED_OFFSET, SEED_SKIP, offsets, skips);
    if (mg_quotas(M, n, weights, quotas))
        goto out;
    memset(table, 0, (size_t)M * sizeof(*table));
    for (i = 0; i < n; i++) {
        if (quotas[i] && weights[i] && ids[i]) {
            if (nl && weights[i] != wmax)
                equal = 0;
            if (weights[i] > wmax)
                wmax = weights[i];
            live[nl++] = i;
        }
    }
#define MG_TURN(b) do {                                              \
        uint32_t pos_ = offsets[b], skip_ = skips[b];                \
        while (used[pos_ >> 6] & (1ull << (pos_ & 63))) {            \
            pos_ += skip_;                                           \
            if (pos_ >= M) pos_ -= M;                                \
        }                                                            \
        used[pos_ >> 6] |= 1ull << (pos_ & 63);                      \
        table[pos_] = ids[b];                                        \
        pos_ += skip_;                                               \
        if (pos_ >= M) pos_ -= M;                                    \
        offsets[b] = pos_;                                           \
        filled++;                                                    \
    } while (0)
    if (equal) {
        /* every backend turns every round: plain round robin */
        while (nl && filled < M) {
            uint32_t k = 0;
            for (uint32_t j = 0; j < nl; j++) {
                uint32_t b = live[j];
                MG_TURN(b);
                if (++taken[b] < quotas[b])
                    live[k++] = b;
            }
            nl = k;
        }
    } else {
        /* order turns by (round, index): heap of round << 32 | index */
        for (i = 0; i < nl; i++)
            heap[i] = mg_round(1, weights[live[i]], wmax) << 32 | live[i];
        for (i = nl; i-- > 0;)
            mg_down(heap, nl, i);
        while (nl && filled < M) {
            uint32_t b = (uint32_t)heap[0];
            MG_TURN(b);
            if (++taken[b] >= quotas[b])
                heap[0] = heap[--nl];
            else
                heap[0] = mg_round(taken[b] + 1, weights[b], wmax) << 32 | b;
            mg_down(heap, nl, 0);
        }
    }
#undef MG_TURN
    ret = (int)filled;
out:
    free(offsets); free(skips); free(quotas); free(taken); free(live); free(heap); free(used);
    return ret;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF_SKELETONS + CDEF)
build_bpf()
ffibuilder.set_source(
    "lb._native",
    SOURCE,
    include_dirs=[str(OUT_DIR), str(BPF_DIR)],
    libraries=["bpf", "elf", "z"],
    extra_compile_args=["-O2", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
