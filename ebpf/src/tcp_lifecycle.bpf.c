// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// TCP connection lifecycle counters from sock:inet_sock_set_state.
//
// Portable by construction: no vmlinux.h and no CO-RE. The tracepoint's field
// offsets are read by the agent from
// /sys/kernel/tracing/events/sock/inet_sock_set_state/format at start-up and
// written into the `const volatile` globals below before load. The loader
// freezes .rodata, so the verifier sees them as constants and the context
// reads below are ordinary fixed-offset tracepoint context accesses. This is
// what lets the same object load on 5.10 (no BTF, `protocol` is a u8 before
// 5.6) and on PREEMPT_RT kernels (every offset shifted).
//
// The verifier allows tracepoint context reads only at offsets fixed in the
// instruction, not through a ctx pointer moved by a (known) value, so the
// record's first `rec_len` bytes are copied once onto the stack and the
// fields are read from there at the configured offsets.
//
// Everything is aggregated in the kernel: one per-CPU array of counters that
// user space sums once per window. No events, no wake-ups.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "tcp_lifecycle.h"

// Field layout of the tracepoint record (defaults: x86_64/aarch64 6.x).
const volatile __u32 off_skaddr = 8;
const volatile __u32 off_oldstate = 16;
const volatile __u32 off_newstate = 20;
const volatile __u32 off_sport = 24;
const volatile __u32 off_dport = 26;
const volatile __u32 off_protocol = 30;
const volatile __u32 size_protocol = 2;
// Bytes of the record to copy: the end of the last field we read.
const volatile __u32 rec_len = 32;

// Counters, indexed by counter_index(kind, dir, class).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} tcpl_counters SEC(".maps");

// Probe self-telemetry, indexed by TCPL_STAT_*.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_STATS);
	__type(key, __u32);
	__type(value, __u64);
} tcpl_stats SEC(".maps");

// Port -> port class (1..TCPL_CLASSES-1), written by the agent from its
// config. A miss means class 0, "other".
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCPL_MAX_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} tcpl_port_class SEC(".maps");

// Established sockets we saw open: socket address -> (direction, class), so
// the close is counted under the same labels. Bounded; a full map is counted
// in TCPL_STAT_SOCK_MAP_FULL and that socket's close becomes "unknown".
struct tcpl_sock {
	__u8 dir;
	__u8 class;
	__u8 pad[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCPL_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct tcpl_sock);
} tcpl_socks SEC(".maps");

static __always_inline void bump(void *map, __u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(map, &idx);
	if (v)
		*v += 1; // per-CPU slot: no atomics needed
}

static __always_inline __u8 port_class(__u16 port)
{
	__u8 *c = bpf_map_lookup_elem(&tcpl_port_class, &port);
	if (c && *c < TCPL_CLASSES)
		return *c;
	return 0;
}

static __always_inline __u32 counter_index(__u32 kind, __u32 dir, __u32 class)
{
	return (kind * TCPL_DIRS + dir) * TCPL_CLASSES + class;
}

#define FIELD(type, off) (*(type *)((char *)rec + (off)))

SEC("tracepoint/sock/inet_sock_set_state")
int tcp_lifecycle(void *ctx)
{
	__u64 rec[TCPL_REC_MAX / 8];
	__u32 n = rec_len;
	if (n > TCPL_REC_MAX)
		n = TCPL_REC_MAX;
	if (bpf_probe_read_kernel(rec, n, ctx) != 0)
		return 0;

	__u32 protocol;
	if (size_protocol == 1)
		protocol = FIELD(__u8, off_protocol);
	else
		protocol = FIELD(__u16, off_protocol);
	if (protocol != TCPL_IPPROTO_TCP)
		return 0;

	int oldstate = FIELD(int, off_oldstate);
	int newstate = FIELD(int, off_newstate);
	__u64 skaddr = FIELD(__u64, off_skaddr);

	if (newstate == TCPL_ESTABLISHED &&
	    (oldstate == TCPL_SYN_SENT || oldstate == TCPL_SYN_RECV)) {
		struct tcpl_sock s = {};
		// Outbound: the class of the remote port. Inbound: of our port.
		if (oldstate == TCPL_SYN_SENT) {
			s.dir = TCPL_DIR_OUT;
			s.class = port_class(FIELD(__u16, off_dport));
		} else {
			s.dir = TCPL_DIR_IN;
			s.class = port_class(FIELD(__u16, off_sport));
		}
		bump(&tcpl_counters, counter_index(TCPL_KIND_OPENED, s.dir, s.class));
		if (bpf_map_update_elem(&tcpl_socks, &skaddr, &s, BPF_ANY) != 0)
			bump(&tcpl_stats, TCPL_STAT_SOCK_MAP_FULL);
		return 0;
	}

	if (newstate != TCPL_CLOSE)
		return 0;

	if (oldstate == TCPL_SYN_SENT) {
		// Refused, timed out or reset during the handshake.
		__u8 class = port_class(FIELD(__u16, off_dport));
		bump(&tcpl_counters, counter_index(TCPL_KIND_FAILED, TCPL_DIR_OUT, class));
		return 0;
	}
	if (oldstate == TCPL_SYN_RECV) {
		__u8 class = port_class(FIELD(__u16, off_sport));
		bump(&tcpl_counters, counter_index(TCPL_KIND_FAILED, TCPL_DIR_IN, class));
		return 0;
	}
	if (oldstate == TCPL_LISTEN || oldstate == TCPL_CLOSE)
		return 0; // a listener going away is not a connection

	struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
	if (s) {
		bump(&tcpl_counters, counter_index(TCPL_KIND_CLOSED, s->dir, s->class));
		bpf_map_delete_elem(&tcpl_socks, &skaddr);
	} else {
		// Opened before the probe was attached (or the map was full).
		bump(&tcpl_counters, counter_index(TCPL_KIND_CLOSED, TCPL_DIR_UNKNOWN, 0));
	}
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
