// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Industrial protocols on TCP: which connections to the Modbus/TCP, MQTT and
// OPC UA ports really speak that protocol (by their first bytes), and for
// Modbus/TCP every request and reply: requests by function code, reply
// latency, exception replies by function and exception code.
//
// Two cgroup_skb programs (ingress and egress) attached to the root of the
// cgroup v2 hierarchy see every IP packet of every socket on the box after
// the IP layer: on loopback and on every interface, in containers too, with
// the socket at hand (its local storage holds the per-connection state).
// The headers are read in place; the payload with bpf_skb_load_bytes, which
// also reads the paged part of an skb. No syscall hook, no kernel BTF, no
// CO-RE: loads on 5.10 (direct packet reads in cgroup_skb 5.2, socket
// storage 5.2, links 5.7; the loops are unrolled).
//
// The reject path (a packet to or from no configured port) is a few loads
// from the packet's headers and two byte loads from a read-only table, plus,
// with the TCP probe on, adding the packet's TCP payload bytes to a per-CPU
// counter of its port class (the TCP probe's tracepoints carry no sizes). The
// programs never change a packet and always let it pass.
//
// Counts live in one array of u64 cells (ipp_cells) that the agent maps
// into its memory and reads once per window without a syscall; packets of
// these protocols are rare enough that shared cells with atomic adds beat
// per-CPU copies (whose memory grows with the CPU count).

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "log2.h"

#include "protocols.h"

// Port -> IPP_PROTO_*, written by the agent before load (frozen).
const volatile __u8 ipp_port_proto[65536] = { 0 };
// Port -> the TCP probe's port class (1..IPP_CLASSES-1, 0 "other"), and
// whether TCP payload bytes are counted at all (the TCP probe is on).
const volatile __u8 ipp_port_class[65536] = { 0 };
const volatile __u32 ipp_count_bytes = 0;

// TCP payload bytes by (flow, port class), per CPU: every TCP packet of
// the box adds here, so no shared cache line.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, IPP_BYTE_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} ipp_bytes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IPP_CELLS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} ipp_cells SEC(".maps");

// Per socket of a configured port (socket local storage: created at its
// first payload, freed with the socket, no table to fill or evict): what
// its client sent first, and the Modbus requests awaiting their reply.
struct ipp_pending {
	__u64 sent_ns; // 0: free
	__u16 tid;     // MBAP transaction identifier
	__u8 unit;
	__u8 function;
	__u32 pad;
};

struct ipp_sock {
	__u8 payload; // IPP_PAYLOAD_*, IPP_PAYLOAD_UNSEEN at first
	__u8 pad[7];
	struct ipp_pending pending[IPP_PENDING];
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ipp_sock);
} ipp_socks SEC(".maps");

static __always_inline void add(__u32 cell, __u64 v)
{
	__u64 *c = bpf_map_lookup_elem(&ipp_cells, &cell);
	if (c)
		__sync_fetch_and_add(c, v);
}

static __always_inline __u32 fn_cell(__u32 side, __u32 function, __u32 what)
{
	return IPP_CELL_FN + (side * IPP_FUNCTIONS + (function & (IPP_FUNCTIONS - 1))) * IPP_FN_CELLS + what;
}

// The first bytes a client sends: does it speak the port's protocol?
static __always_inline __u8 classify(struct __sk_buff *skb, __u32 off, __u8 proto)
{
	__u8 b[12] = {};
	__u32 avail = skb->len - off;
	if (avail >= sizeof(b)) {
		if (bpf_skb_load_bytes(skb, off, b, sizeof(b)))
			return IPP_PAYLOAD_OTHER;
	} else if (avail >= 8) {
		if (bpf_skb_load_bytes(skb, off, b, 8))
			return IPP_PAYLOAD_OTHER;
	} else {
		return IPP_PAYLOAD_OTHER;
	}
	// TLS record header: handshake (22), version 3.x.
	if (b[0] == 0x16 && b[1] == 3 && b[2] <= 4)
		return IPP_PAYLOAD_TLS;
	if (proto == IPP_PROTO_MODBUS) {
		// MBAP: protocol id 0, length 2..254 (unit id + PDU), function 1..127.
		__u16 len = (__u16)b[4] << 8 | b[5];
		if (b[2] == 0 && b[3] == 0 && len >= 2 && len <= 254 && b[7] >= 1 && b[7] <= 127)
			return IPP_PAYLOAD_MATCHED;
		return IPP_PAYLOAD_OTHER;
	}
	if (proto == IPP_PROTO_MQTT) {
		// CONNECT (type 1), remaining length (1..4 bytes, 7-bit groups),
		// then the protocol name: "MQTT" (3.1.1, 5) or "MQIsdp" (3.1).
		if (b[0] != 0x10)
			return IPP_PAYLOAD_OTHER;
		__u32 n = 1;
		if (b[1] & 0x80) {
			n = 2;
			if (b[2] & 0x80)
				n = (b[3] & 0x80) ? 4 : 3;
		}
		__u8 name[8] = {};
		if (avail < 1 + n + 8 || bpf_skb_load_bytes(skb, off + 1 + n, name, 8))
			return IPP_PAYLOAD_OTHER;
		if (name[0] == 0 && name[1] == 4 && name[2] == 'M' && name[3] == 'Q' && name[4] == 'T' && name[5] == 'T')
			return IPP_PAYLOAD_MATCHED;
		if (name[0] == 0 && name[1] == 6 && name[2] == 'M' && name[3] == 'Q' && name[4] == 'I' && name[5] == 's' &&
		    name[6] == 'd' && name[7] == 'p')
			return IPP_PAYLOAD_MATCHED;
		return IPP_PAYLOAD_OTHER;
	}
	if (proto == IPP_PROTO_OPCUA) {
		// OPC UA Connection Protocol: "HEL" + 'F', then the message size.
		if (b[0] == 'H' && b[1] == 'E' && b[2] == 'L' && b[3] == 'F')
			return IPP_PAYLOAD_MATCHED;
		return IPP_PAYLOAD_OTHER;
	}
	return IPP_PAYLOAD_OTHER;
}

// A request: into the socket's pending slots. The slot of the same
// (transaction, unit) if one is pending (that request is given up), else a
// free one, else the oldest (given up).
static __always_inline void remember(struct ipp_sock *st, __u32 side, __u16 tid, __u8 unit, __u8 function, __u64 now)
{
	__u32 at = IPP_PENDING, free = IPP_PENDING, oldest = 0;
	__u64 oldest_ns = ~0ULL;
#pragma unroll
	for (__u32 i = 0; i < IPP_PENDING; i++) {
		struct ipp_pending *p = &st->pending[i];
		if (!p->sent_ns) {
			if (free == IPP_PENDING)
				free = i;
			continue;
		}
		if (p->tid == tid && p->unit == unit)
			at = i;
		if (p->sent_ns < oldest_ns) {
			oldest_ns = p->sent_ns;
			oldest = i;
		}
	}
	if (at == IPP_PENDING)
		at = free;
	if (at == IPP_PENDING)
		at = oldest;
	if (at >= IPP_PENDING)
		return;
	struct ipp_pending *p = &st->pending[at];
	if (p->sent_ns)
		add(IPP_CELL_ABANDONED + side, 1);
	p->sent_ns = now;
	p->tid = tid;
	p->unit = unit;
	p->function = function;
}

// A reply: its pending request, or IPP_PENDING.
static __always_inline __u32 find(struct ipp_sock *st, __u16 tid, __u8 unit, __u8 function)
{
	__u32 at = IPP_PENDING;
#pragma unroll
	for (__u32 i = 0; i < IPP_PENDING; i++) {
		struct ipp_pending *p = &st->pending[i];
		if (p->sent_ns && p->tid == tid && p->unit == unit && p->function == function)
			at = i;
	}
	return at;
}

// Every Modbus/TCP ADU of the segment (up to IPP_MAX_ADUS): requests are
// remembered by (transaction id, unit) on their socket and timed to their
// reply.
static __always_inline void modbus(struct __sk_buff *skb, __u32 off, struct ipp_sock *st, __u32 side, int request)
{
	__u64 now = bpf_ktime_get_ns();
#pragma unroll
	for (int i = 0; i < IPP_MAX_ADUS; i++) {
		__u8 h[8];
		if (off > 0xffff || off + sizeof(h) > skb->len)
			return;
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)))
			return;
		__u16 len = (__u16)h[4] << 8 | h[5];
		if (h[2] != 0 || h[3] != 0 || len < 2 || len > 254)
			return; // not (or no longer) an MBAP header
		__u8 function = h[7] & 0x7f;
		__u16 tid = (__u16)h[0] << 8 | h[1];
		if (request) {
			add(fn_cell(side, function, IPP_FN_REQUESTS), 1);
			remember(st, side, tid, h[6], function, now);
		} else {
			__u32 at = find(st, tid, h[6], function);
			if (at >= IPP_PENDING) {
				add(IPP_CELL_UNMATCHED + side, 1);
			} else {
				struct ipp_pending *p = &st->pending[at];
				__u64 us = (now - p->sent_ns) / 1000;
				p->sent_ns = 0;
				add(fn_cell(side, function, IPP_FN_SUM_US), us);
				add(fn_cell(side, function, IPP_FN_BUCKET0 + log2_bucket_of(us, IPP_BUCKETS - 1)), 1);
				if (h[7] & 0x80) {
					__u8 code = 0;
					if (off + 9 <= skb->len)
						bpf_skb_load_bytes(skb, off + 8, &code, 1);
					if (code >= IPP_EXC_CODES)
						code = 0;
					add(IPP_CELL_EXC + (side * IPP_FUNCTIONS + function) * IPP_EXC_CODES + code, 1);
				}
			}
		}
		off += 6 + len;
	}
}

// A port read as two bytes, bounded for the verifier: before 6.x some
// verifiers (Debian's 6.1 arm64 kernel, seen in hil-tests) lose the bounds of
// (hi << 8 | lo) and refuse it as an array index ("math between map_value
// pointer and register with unbounded min value"). The mask is an
// instruction of its own because clang knows the value fits in 16 bits and
// would drop a mask written in C.
static __always_inline __u64 port_at(const __u8 *p)
{
	__u64 port = (__u64)p[0] << 8 | p[1];
	asm volatile("%0 &= 0xffff" : "+r"(port));
	return port;
}

static __always_inline int inspect(struct __sk_buff *skb, int egress)
{
	// skb data starts at the network header in cgroup_skb programs, and
	// the IP and TCP headers are in the linear part: read them in place.
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *ip = data;
	__u32 l4;
	if ((void *)(ip + 20) > end)
		return 1;
	if ((ip[0] >> 4) == 4) {
		if (ip[9] != 6 /* TCP */ || ((ip[6] & 0x3f) | ip[7]) != 0 /* a fragment */)
			return 1;
		l4 = (ip[0] & 0xf) * 4;
	} else if ((ip[0] >> 4) == 6) {
		// Extension headers are not followed (TCP directly after is the rule).
		if (ip[6] != 6)
			return 1;
		l4 = 40;
	} else {
		return 1;
	}
	__u8 *th = data + l4;
	if ((void *)(th + 13) > end)
		return 1;
	__u64 sport = port_at(th);
	__u64 dport = port_at(th + 2);
	__u32 off = l4 + (th[12] >> 4) * 4;
	if (skb->len <= off)
		return 1; // no payload: handshake, ACK, FIN
	if (ipp_count_bytes) {
		// Classed like the TCP probe: by the port a client connects to.
		__u32 class = ipp_port_class[dport];
		if (!class)
			class = ipp_port_class[sport];
		__u32 slot = (egress ? IPP_FLOW_SENT : IPP_FLOW_RECEIVED) * IPP_CLASSES + (class & (IPP_CLASSES - 1));
		__u64 *bytes = bpf_map_lookup_elem(&ipp_bytes, &slot);
		if (bytes)
			*bytes += skb->len - off;
	}
	__u8 to_port = ipp_port_proto[dport];
	__u8 from_port = ipp_port_proto[sport];
	if (!to_port && !from_port)
		return 1;
	// A segment to the protocol's port is the client's (a request).
	int request = to_port != 0;
	__u8 proto = request ? to_port : from_port;
	__u32 side = (egress == request) ? IPP_SIDE_CLIENT : IPP_SIDE_SERVER;
	if (proto >= IPP_PROTOS)
		return 1;

	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	struct ipp_sock *st = bpf_sk_storage_get(&ipp_socks, sk, 0, 0);
	if (!st) {
		if (!request)
			return 1; // the client speaks first
		st = bpf_sk_storage_get(&ipp_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return 1;
		st->payload = IPP_PAYLOAD_UNSEEN;
	}
	if (st->payload == IPP_PAYLOAD_UNSEEN) {
		__u8 payload = classify(skb, off, proto);
		st->payload = payload;
		if (payload < IPP_PAYLOADS)
			add(IPP_CELL_CONN + (proto * IPP_SIDES + side) * IPP_PAYLOADS + payload, 1);
	}
	if (proto == IPP_PROTO_MODBUS && st->payload == IPP_PAYLOAD_MATCHED)
		modbus(skb, off, st, side, request);
	return 1;
}

SEC("cgroup_skb/ingress")
int ipp_ingress(struct __sk_buff *skb)
{
	return inspect(skb, 0);
}

SEC("cgroup_skb/egress")
int ipp_egress(struct __sk_buff *skb)
{
	return inspect(skb, 1);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
