// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// TCP connection lifecycle, retransmits and resets, from five classic
// tracepoints: sock:inet_sock_set_state, tcp:tcp_retransmit_skb,
// tcp:tcp_retransmit_synack, tcp:tcp_receive_reset and tcp:tcp_send_reset.
//
// Portable by construction: no vmlinux.h and no CO-RE. Each tracepoint's
// field offsets are read by the agent from its tracefs format file at
// start-up and written into the `const volatile` globals below before load.
// The loader freezes .rodata, so the verifier sees them as constants. This
// is what lets the same object load on 5.10 (no BTF, `protocol` a u8 before
// 5.6) and on PREEMPT_RT kernels (every offset shifted).
//
// The verifier allows tracepoint context reads only at offsets fixed in the
// instruction, so each program copies the first `*_rec_len` bytes of its
// record onto the stack once and reads the fields from there.
//
// Everything is aggregated in the kernel: per-CPU arrays of counters and
// histograms that user space sums once per window. No events, no wake-ups.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "log2.h"

#include "tcp_lifecycle.h"

// sock:inet_sock_set_state (defaults: x86_64/aarch64 6.x).
const volatile __u32 off_skaddr = 8;
const volatile __u32 off_oldstate = 16;
const volatile __u32 off_newstate = 20;
const volatile __u32 off_sport = 24;
const volatile __u32 off_dport = 26;
const volatile __u32 off_protocol = 30;
const volatile __u32 size_protocol = 2;
const volatile __u32 rec_len = 32;

// The remote address, for the peer allowlist; peers_on = 0 when no peer is
// configured (then nothing below is ever looked at).
const volatile __u32 peers_on = 0;
const volatile __u32 off_family = 28;
const volatile __u32 off_daddr = 36;
const volatile __u32 off_daddr_v6 = 56;

// tcp:tcp_retransmit_skb
const volatile __u32 rt_off_skaddr = 16;
const volatile __u32 rt_off_state = 24;
const volatile __u32 rt_off_sport = 28;
const volatile __u32 rt_off_dport = 30;
// Kernels with the `err` field trace failed attempts too (e.g. -EBUSY, the
// packet still queued below): only successful ones are retransmissions.
const volatile __u32 rt_off_err = 0; // 0: no such field
const volatile __u32 rt_rec_len = 32;

// tcp:tcp_retransmit_synack (a listener's handshake answer sent again)
const volatile __u32 ra_off_sport = 24;
const volatile __u32 ra_rec_len = 26;

// tcp:tcp_receive_reset
const volatile __u32 rr_off_skaddr = 8;
const volatile __u32 rr_off_sport = 16;
const volatile __u32 rr_off_dport = 18;
const volatile __u32 rr_rec_len = 20;

// tcp:tcp_send_reset. Older kernels have sport/dport fields (host order);
// newer ones sockaddr saddr/daddr, whose port (network order) is at +2.
const volatile __u32 rs_off_skaddr = 16;
const volatile __u32 rs_off_sport = 34;
const volatile __u32 rs_off_dport = 62;
const volatile __u32 rs_ports_be = 1;
const volatile __u32 rs_rec_len = 64;

// tcp:tcp_probe (every received segment of an established connection;
// only watched ports are looked at). skaddr is absent on old kernels (0).
const volatile __u32 tp_off_sport = 64;
const volatile __u32 tp_off_dport = 66;
const volatile __u32 tp_off_cwnd = 88;
const volatile __u32 tp_off_srtt = 100;
const volatile __u32 tp_off_skaddr = 128;
const volatile __u32 tp_rec_len = 136;

// Counters per (direction, port class): one u64 per TCPL_KIND_*.
struct tcpl_kinds {
	__u64 n[TCPL_KINDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_SLOTS);
	__type(key, __u32);
	__type(value, struct tcpl_kinds);
} tcpl_counters SEC(".maps");

// Histograms per (histogram, direction, port class).
struct tcpl_hist {
	__u64 sum;
	__u64 buckets[TCPL_BUCKETS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_HIST_SLOTS);
	__type(key, __u32);
	__type(value, struct tcpl_hist);
} tcpl_hist SEC(".maps");

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

// Peer allowlist: prefix -> peer group. IPv4 addresses as IPv4-mapped IPv6
// (::ffff:a.b.c.d), so one trie holds both families.
struct tcpl_peer_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TCPL_MAX_PEER_PREFIXES);
	__type(key, struct tcpl_peer_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} tcpl_peers SEC(".maps");

// Counters per (direction, peer group): one u64 per TCPL_PEER_KIND_*.
struct tcpl_peer_kinds {
	__u64 n[TCPL_PEER_KINDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_PEER_SLOTS);
	__type(key, __u32);
	__type(value, struct tcpl_peer_kinds);
} tcpl_peer_counters SEC(".maps");

// Connect latency (outbound) per peer group.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TCPL_PEERS);
	__type(key, __u32);
	__type(value, struct tcpl_hist);
} tcpl_peer_hist SEC(".maps");

// Connections in progress or established: socket address -> labels and the
// time of the last state we time from (connect start, then establishment).
// Bounded; a full map is counted in TCPL_STAT_SOCK_MAP_FULL and that
// socket's later events fall back to "unknown".
struct tcpl_sock {
	__u64 since_ns;
	__u8 dir;
	__u8 class;
	__u8 flags;
	__u8 peer;
	__u8 pad[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TCPL_MAX_SOCKS);
	__type(key, __u64);
	__type(value, struct tcpl_sock);
} tcpl_socks SEC(".maps");

static __always_inline void count(__u32 kind, __u32 dir, __u32 class)
{
	__u32 slot = dir * TCPL_CLASSES + class;
	struct tcpl_kinds *k = bpf_map_lookup_elem(&tcpl_counters, &slot);
	if (k && kind < TCPL_KINDS)
		k->n[kind] += 1; // per-CPU slot: no atomics needed
}

static __always_inline void stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tcpl_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline __u32 log2_bucket(__u64 v)
{
	return log2_bucket_of(v, TCPL_BUCKETS - 1);
}

static __always_inline void hist_add(struct tcpl_hist *h, __u64 v)
{
	if (!h)
		return;
	h->sum += v;
	__u32 b = log2_bucket(v);
	if (b < TCPL_BUCKETS)
		h->buckets[b] += 1;
}

static __always_inline void observe(__u32 hist, __u32 dir, __u32 class, __u64 v)
{
	if (dir > TCPL_DIR_IN)
		return;
	__u32 slot = (hist * 2 + dir) * TCPL_CLASSES + class;
	hist_add(bpf_map_lookup_elem(&tcpl_hist, &slot), v);
}

static __always_inline __u8 port_class(__u16 port)
{
	__u8 *c = bpf_map_lookup_elem(&tcpl_port_class, &port);
	if (c && *c < TCPL_CLASSES)
		return *c;
	return 0;
}

static __always_inline void remember(__u64 skaddr, __u8 dir, __u8 class, __u8 peer, __u64 now)
{
	struct tcpl_sock s = { .since_ns = now, .dir = dir, .class = class, .peer = peer };
	if (bpf_map_update_elem(&tcpl_socks, &skaddr, &s, BPF_NOEXIST) == 0) {
		stat(TCPL_STAT_SOCKS_ADDED);
		return;
	}
	// Already there (a reused address whose close we missed), or full.
	if (bpf_map_update_elem(&tcpl_socks, &skaddr, &s, BPF_EXIST) != 0)
		stat(TCPL_STAT_SOCK_MAP_FULL);
}

static __always_inline void forget(__u64 skaddr)
{
	if (bpf_map_delete_elem(&tcpl_socks, &skaddr) == 0)
		stat(TCPL_STAT_SOCKS_REMOVED);
}

#define FIELD(type, off) (*(type *)((char *)rec + (off)))

// Copies the first `len` bytes of the tracepoint record to `rec`.
#define COPY_RECORD(rec, len)                                            \
	__u64 rec[TCPL_REC_MAX / 8];                                     \
	do {                                                             \
		__u32 n__ = (len);                                       \
		if (n__ > TCPL_REC_MAX)                                  \
			n__ = TCPL_REC_MAX;                              \
		if (bpf_probe_read_kernel(rec, n__, ctx) != 0)           \
			return 0;                                        \
	} while (0)

static __always_inline void peer_count(__u32 kind, __u32 dir, __u8 peer)
{
	if (!peers_on || dir > TCPL_DIR_IN)
		return;
	__u32 slot = dir * TCPL_PEERS + (peer & (TCPL_PEERS - 1));
	struct tcpl_peer_kinds *k = bpf_map_lookup_elem(&tcpl_peer_counters, &slot);
	if (k && kind < TCPL_PEER_KINDS)
		k->n[kind] += 1;
}

static __always_inline void peer_observe(__u8 peer, __u64 v)
{
	if (!peers_on)
		return;
	__u32 slot = peer & (TCPL_PEERS - 1);
	hist_add(bpf_map_lookup_elem(&tcpl_peer_hist, &slot), v);
}

// The peer group of the record's remote address (0 when none matches, or
// when no peer is configured: no lookup then).
static __always_inline __u8 peer_of(__u64 *rec)
{
	if (!peers_on)
		return 0;
	struct tcpl_peer_key k = { .prefixlen = 128 };
	__u16 family = FIELD(__u16, off_family);
	if (family == TCPL_AF_INET) {
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		__builtin_memcpy(&k.addr[12], (char *)rec + off_daddr, 4);
	} else if (family == TCPL_AF_INET6) {
		__builtin_memcpy(k.addr, (char *)rec + off_daddr_v6, 16);
	} else {
		return 0;
	}
	__u8 *p = bpf_map_lookup_elem(&tcpl_peers, &k);
	return p && *p < TCPL_PEERS ? *p : 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int tcp_lifecycle(void *ctx)
{
	COPY_RECORD(rec, rec_len);

	__u32 protocol;
	if (size_protocol == 1)
		protocol = FIELD(__u8, off_protocol);
	else
		protocol = FIELD(__u16, off_protocol);
	if (protocol != TCPL_IPPROTO_TCP)
		return 0;

	int oldstate = FIELD(int, off_oldstate);
	int newstate = FIELD(int, off_newstate);
	// Only these transitions matter; the rest (FIN_WAIT*, TIME_WAIT, ...)
	// leave at once.
	if (newstate != TCPL_SYN_SENT && newstate != TCPL_ESTABLISHED && newstate != TCPL_CLOSE &&
	    newstate != TCPL_CLOSE_WAIT && oldstate != TCPL_CLOSE_WAIT)
		return 0;
	__u64 skaddr = FIELD(__u64, off_skaddr);

	if (newstate == TCPL_CLOSE_WAIT || oldstate == TCPL_CLOSE_WAIT) {
		// The peer closed; the connection waits for our application to
		// close too. Entries and exits per labels: their difference is
		// how many wait now (an application leaking sockets shows here).
		struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
		__u8 dir = s ? s->dir : TCPL_DIR_UNKNOWN;
		__u8 class = s ? s->class : 0;
		count(newstate == TCPL_CLOSE_WAIT ? TCPL_KIND_CW_ENTERED : TCPL_KIND_CW_LEFT, dir, class);
		if (newstate != TCPL_CLOSE)
			return 0;
	}
	__u64 now = bpf_ktime_get_ns();

	if (newstate == TCPL_SYN_SENT) {
		// connect(): time the handshake from here. The peer group is
		// looked up once per connection, here or at accept.
		remember(skaddr, TCPL_DIR_OUT, port_class(FIELD(__u16, off_dport)), peer_of(rec), now);
		return 0;
	}

	if (newstate == TCPL_ESTABLISHED && oldstate == TCPL_SYN_SENT) {
		struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
		__u8 class = port_class(FIELD(__u16, off_dport));
		count(TCPL_KIND_OPENED, TCPL_DIR_OUT, class);
		if (s) {
			__u64 us = (now - s->since_ns) / 1000;
			observe(TCPL_HIST_CONNECT_US, TCPL_DIR_OUT, class, us);
			peer_count(TCPL_PEER_KIND_OPENED, TCPL_DIR_OUT, s->peer);
			peer_observe(s->peer, us);
			s->since_ns = now;
		} else {
			__u8 peer = peer_of(rec);
			peer_count(TCPL_PEER_KIND_OPENED, TCPL_DIR_OUT, peer);
			remember(skaddr, TCPL_DIR_OUT, class, peer, now);
		}
		return 0;
	}

	if (newstate == TCPL_ESTABLISHED && oldstate == TCPL_SYN_RECV) {
		// Outbound: the class of the remote port. Inbound: of our port.
		__u8 class = port_class(FIELD(__u16, off_sport));
		__u8 peer = peer_of(rec);
		count(TCPL_KIND_OPENED, TCPL_DIR_IN, class);
		peer_count(TCPL_PEER_KIND_OPENED, TCPL_DIR_IN, peer);
		remember(skaddr, TCPL_DIR_IN, class, peer, now);
		return 0;
	}

	if (newstate != TCPL_CLOSE)
		return 0;

	if (oldstate == TCPL_SYN_SENT) {
		// Refused (a reset came), timed out, or aborted by the application.
		__u8 class = port_class(FIELD(__u16, off_dport));
		count(TCPL_KIND_FAILED, TCPL_DIR_OUT, class);
		struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
		__u8 peer = s ? s->peer : peer_of(rec);
		peer_count(TCPL_PEER_KIND_FAILED, TCPL_DIR_OUT, peer);
		if (s) {
			if (s->flags & TCPL_SOCK_RST_RECEIVED) {
				count(TCPL_KIND_REFUSED, TCPL_DIR_OUT, class);
				peer_count(TCPL_PEER_KIND_REFUSED, TCPL_DIR_OUT, peer);
			}
			forget(skaddr);
		}
		return 0;
	}
	if (oldstate == TCPL_SYN_RECV) {
		count(TCPL_KIND_FAILED, TCPL_DIR_IN, port_class(FIELD(__u16, off_sport)));
		peer_count(TCPL_PEER_KIND_FAILED, TCPL_DIR_IN, peer_of(rec));
		return 0;
	}
	if (oldstate == TCPL_LISTEN || oldstate == TCPL_CLOSE)
		return 0; // a listener going away is not a connection

	struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
	if (s) {
		count(TCPL_KIND_CLOSED, s->dir, s->class);
		peer_count(TCPL_PEER_KIND_CLOSED, s->dir, s->peer);
		observe(TCPL_HIST_DURATION_MS, s->dir, s->class, (now - s->since_ns) / 1000000);
		forget(skaddr);
	} else {
		// Opened before the probe was attached (or the map was full).
		count(TCPL_KIND_CLOSED, TCPL_DIR_UNKNOWN, 0);
	}
	return 0;
}

// Labels of an event on a socket: from the map when we saw it open, else
// from its state and ports.
static __always_inline void labels(__u64 skaddr, __u16 sport, __u16 dport, __u8 *dir, __u8 *class)
{
	struct tcpl_sock *s = skaddr ? bpf_map_lookup_elem(&tcpl_socks, &skaddr) : 0;
	if (s) {
		*dir = s->dir;
		*class = s->class;
		return;
	}
	*dir = TCPL_DIR_UNKNOWN;
	*class = port_class(dport);
	if (*class == 0)
		*class = port_class(sport);
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tcp_retransmit(void *ctx)
{
	COPY_RECORD(rec, rt_rec_len);
	if (rt_off_err && FIELD(int, rt_off_err) != 0)
		return 0;
	__u64 skaddr = FIELD(__u64, rt_off_skaddr);
	__u8 dir, class;
	labels(skaddr, FIELD(__u16, rt_off_sport), FIELD(__u16, rt_off_dport), &dir, &class);
	count(TCPL_KIND_RETRANS, dir, class);
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_synack")
int tcp_retransmit_synack(void *ctx)
{
	COPY_RECORD(rec, ra_rec_len);
	// Traced only when sent: the kernel counts it in RetransSegs too.
	count(TCPL_KIND_RETRANS, TCPL_DIR_IN, port_class(FIELD(__u16, ra_off_sport)));
	return 0;
}

SEC("tracepoint/tcp/tcp_probe")
int tcp_rtt(void *ctx)
{
	COPY_RECORD(rec, tp_rec_len);
	__u16 sport = FIELD(__u16, tp_off_sport);
	__u16 dport = FIELD(__u16, tp_off_dport);
	// Watched ports only: everything else leaves after two lookups.
	__u8 out_class = port_class(dport);
	__u8 in_class = port_class(sport);
	if (!out_class && !in_class)
		return 0;
	__u8 dir = out_class ? TCPL_DIR_OUT : TCPL_DIR_IN;
	__u8 class = out_class ? out_class : in_class;
	if (tp_off_skaddr) {
		// A connection we saw open knows its direction.
		__u64 skaddr = FIELD(__u64, tp_off_skaddr);
		struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
		if (s && s->dir <= TCPL_DIR_IN) {
			dir = s->dir;
			class = s->class;
		}
	}
	observe(TCPL_HIST_RTT_US, dir, class, FIELD(__u32, tp_off_srtt));
	observe(TCPL_HIST_CWND, dir, class, FIELD(__u32, tp_off_cwnd));
	return 0;
}

SEC("tracepoint/tcp/tcp_receive_reset")
int tcp_receive_reset(void *ctx)
{
	COPY_RECORD(rec, rr_rec_len);
	__u64 skaddr = FIELD(__u64, rr_off_skaddr);
	__u8 dir, class;
	labels(skaddr, FIELD(__u16, rr_off_sport), FIELD(__u16, rr_off_dport), &dir, &class);
	count(TCPL_KIND_RST_RECV, dir, class);
	struct tcpl_sock *s = bpf_map_lookup_elem(&tcpl_socks, &skaddr);
	if (s)
		s->flags |= TCPL_SOCK_RST_RECEIVED; // a handshake ending now was refused
	return 0;
}

SEC("tracepoint/tcp/tcp_send_reset")
int tcp_send_reset(void *ctx)
{
	COPY_RECORD(rec, rs_rec_len);
	__u64 skaddr = FIELD(__u64, rs_off_skaddr);
	__u16 sport = FIELD(__u16, rs_off_sport);
	__u16 dport = FIELD(__u16, rs_off_dport);
	if (rs_ports_be) {
		sport = __builtin_bswap16(sport);
		dport = __builtin_bswap16(dport);
	}
	__u8 dir, class;
	if (!skaddr) {
		// No socket: someone knocked on a port nobody listens on; the
		// reset answers an inbound attempt on our port.
		dir = TCPL_DIR_IN;
		class = port_class(sport);
	} else {
		labels(skaddr, sport, dport, &dir, &class);
	}
	count(TCPL_KIND_RST_SENT, dir, class);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
