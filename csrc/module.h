/* SPDX-License-Identifier: GPL-2.0 */
/* The preamble of the cffi module: our helpers and the generated skeletons (each embeds
 * its BPF object, so only this one file includes them). */
#include "native.h"
#include "lb.skel.h"
#include "decap.skel.h"
#include "bench.skel.h"
