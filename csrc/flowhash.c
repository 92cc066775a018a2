// SPDX-License-Identifier: GPL-2.0
/* The data path's MurmurHash3, for lb/flowhash.py (`xdplb explain`, the tests'
 * predictions) and Maglev: one copy, in bpf/flowhash.h. */
#include "native.h"
#include "flowhash.h"

uint32_t xdplb_murmur3(const uint32_t *words, uint32_t n, uint32_t seed)
{
	return murmur3_words(words, n, seed);
}
