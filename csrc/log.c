// SPDX-License-Identifier: GPL-2.0
/* libbpf's messages (the verifier log among them) go to a buffer while capture is on,
 * so a load failure can be reported with its log instead of on stderr. */
#include <stdarg.h>
#include <stdio.h>
#include "native.h"

static char log_buf[1 << 20];
static size_t log_len;
static int log_on;

static int log_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	size_t room = sizeof(log_buf) - log_len;
	int n;

	if (!log_on || level == LIBBPF_DEBUG || room <= 1)
		return 0;
	n = vsnprintf(log_buf + log_len, room, fmt, ap);
	if (n > 0)
		log_len += (size_t)n < room ? (size_t)n : room - 1;
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
