/* SPDX-License-Identifier: GPL-2.0 */
/* Internet checksum helpers (RFC 1071), all on 32-bit partial sums. */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold32(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Sum of n words in memory order (the result stays in network byte order): csum_words
 * over 16-bit words, csum_addr over the 32-bit words of an address. One loop, two widths:
 * loading an address as 16-bit halves would double its loads. */
#define CSUM_SUM(name, word_t)								\
	static __always_inline __u64 name(const word_t *p, int n)			\
	{										\
		__u64 s = 0;								\
		_Pragma("unroll") for (int i = 0; i < n; i++) s += p[i];		\
		return s;								\
	}
CSUM_SUM(csum_words, __u16)
CSUM_SUM(csum_addr, __u32)

/* Sum of a pseudo-header (addresses already summed by the caller). proto and len are
 * host order; the result is comparable with sums of network-order words. */
static __always_inline __u64 csum_pseudo_tail(__u8 proto, __u32 len)
{
	return (__u64)bpf_htons(proto) + bpf_htonl(len);
}

#endif
