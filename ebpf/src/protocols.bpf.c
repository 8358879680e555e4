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
// the socket at hand (its cookie keys the per-connection state). The
// payload of a segment is read with bpf_skb_load_bytes, which also reads
// the paged part of an skb. No syscall hook, no BTF, no CO-RE: loads on
// 5.10 (cgroup_skb 4.10, socket cookie 4.12, bounded loops are unrolled).
//
// The reject path (a packet to or from no configured port) is three small
// loads from the packet and two byte loads from a read-only table. The
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, IPP_CELLS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} ipp_cells SEC(".maps");

// Socket cookie -> IPP_PAYLOAD_* of that connection (after its first
// client payload). Least recently used entries make room: a connection
// idle past IPP_MAX_CONNS newer ones is classified again at its next packet.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, IPP_MAX_CONNS);
	__type(key, __u64);
	__type(value, __u8);
} ipp_conns SEC(".maps");

struct ipp_txn {
	__u64 cookie; // the socket: client and server ends are separate
	__u16 tid;    // MBAP transaction identifier
	__u8 unit;
	__u8 pad[5];
};

struct ipp_req {
	__u64 sent_ns;
	__u8 function;
	__u8 pad[7];
};

// Modbus requests seen and not yet answered.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, IPP_MAX_PENDING);
	__type(key, struct ipp_txn);
	__type(value, struct ipp_req);
} ipp_pending SEC(".maps");

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

// Every Modbus/TCP ADU of the segment (up to IPP_MAX_ADUS): requests are
// remembered by (socket, transaction id, unit) and timed to their reply.
static __always_inline void modbus(struct __sk_buff *skb, __u32 off, __u64 cookie, __u32 side, int request)
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
		struct ipp_txn key = { .cookie = cookie, .tid = (__u16)h[0] << 8 | h[1], .unit = h[6] };
		if (request) {
			struct ipp_req r = { .sent_ns = now, .function = function };
			add(fn_cell(side, function, IPP_FN_REQUESTS), 1);
			if (bpf_map_update_elem(&ipp_pending, &key, &r, BPF_NOEXIST) != 0) {
				// Same transaction id still pending: its reply never came.
				add(IPP_CELL_REPLACED + side, 1);
				bpf_map_update_elem(&ipp_pending, &key, &r, BPF_ANY);
			}
		} else {
			struct ipp_req *r = bpf_map_lookup_elem(&ipp_pending, &key);
			if (!r || r->function != function) {
				add(IPP_CELL_UNMATCHED + side, 1);
			} else {
				__u64 us = (now - r->sent_ns) / 1000;
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
				bpf_map_delete_elem(&ipp_pending, &key);
			}
		}
		off += 6 + len;
	}
}

static __always_inline int inspect(struct __sk_buff *skb, int egress)
{
	// skb data starts at the network header in cgroup_skb programs.
	__u8 ip[20];
	__u32 l4;
	if (bpf_skb_load_bytes(skb, 0, ip, 1))
		return 1;
	if ((ip[0] >> 4) == 4) {
		if (bpf_skb_load_bytes(skb, 0, ip, 20))
			return 1;
		if (ip[9] != 6 /* TCP */ || ((ip[6] & 0x3f) | ip[7]) != 0 /* a fragment */)
			return 1;
		l4 = (ip[0] & 0xf) * 4;
	} else if ((ip[0] >> 4) == 6) {
		// Extension headers are not followed (TCP directly after is the rule).
		if (bpf_skb_load_bytes(skb, 6, ip, 1) || ip[0] != 6)
			return 1;
		l4 = 40;
	} else {
		return 1;
	}
	__u8 th[13];
	if (bpf_skb_load_bytes(skb, l4, th, sizeof(th)))
		return 1;
	__u16 sport = (__u16)th[0] << 8 | th[1];
	__u16 dport = (__u16)th[2] << 8 | th[3];
	__u8 to_port = ipp_port_proto[dport];
	__u8 from_port = ipp_port_proto[sport];
	if (!to_port && !from_port)
		return 1;
	__u32 off = l4 + (th[12] >> 4) * 4;
	if (skb->len <= off)
		return 1; // no payload: handshake, ACK, FIN
	// A segment to the protocol's port is the client's (a request).
	int request = to_port != 0;
	__u8 proto = request ? to_port : from_port;
	__u32 side = (egress == request) ? IPP_SIDE_CLIENT : IPP_SIDE_SERVER;
	if (proto >= IPP_PROTOS)
		return 1;

	__u64 cookie = bpf_get_socket_cookie(skb);
	__u8 *seen = bpf_map_lookup_elem(&ipp_conns, &cookie);
	__u8 payload;
	if (seen) {
		payload = *seen;
	} else {
		if (!request)
			return 1; // the client speaks first
		payload = classify(skb, off, proto);
		bpf_map_update_elem(&ipp_conns, &cookie, &payload, BPF_ANY);
		if (payload < IPP_PAYLOADS)
			add(IPP_CELL_CONN + (proto * IPP_SIDES + side) * IPP_PAYLOADS + payload, 1);
	}
	if (proto == IPP_PROTO_MODBUS && payload == IPP_PAYLOAD_MATCHED)
		modbus(skb, off, cookie, side, request);
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
