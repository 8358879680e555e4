/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* log2 histogram buckets, shared by the probes. */
#ifndef EDGE_LOG2_H
#define EDGE_LOG2_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* Index of the highest set bit of v (0 for 0 and 1), at most last: the
 * log2 bucket of v in a histogram of last + 1 buckets. */
static __always_inline __u32 log2_bucket_of(__u64 v, __u32 last)
{
	__u32 b = 0;
#pragma unroll
	for (int i = 32; i > 0; i /= 2) {
		if (v >> i) {
			v >>= i;
			b += i;
		}
	}
	return b < last ? b : last;
}

#endif
