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

// Process values (docs/process-values.md): with a tag map, the registers
// and coils of mapped addresses that a read's reply returns or a write
// request sends reach user space through ipp_values; every other register
// is zeroed here and never leaves the kernel. ipp_tags holds, per (side,
// unit, table, address / 64), the mapped addresses' bits. Without tags
// (ipp_capture 0) none of this runs.
const volatile __u32 ipp_capture = 0;
// `edge-agent tags discover`: every address counts as mapped (what the
// command prints stays in the terminal of whoever ran it).
const volatile __u32 ipp_discover = 0;

struct ipp_tag_key {
	__u8 side;
	__u8 unit;
	__u8 table;
	__u8 pad;
	__u32 chunk; // address / 64
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ipp_tag_key);
	__type(value, __u64);
} ipp_tags SEC(".maps");

struct ipp_value {
	__u64 ts_ns;  // bpf_ktime_get_ns when the packet passed
	__u64 cookie; // the socket's cookie: pairs a write with its reply
	__u8 server[16]; // the server's address (IPv4-mapped for IPv4)
	__u16 server_port;
	__u16 tid;
	__u16 start;    // first address
	__u16 quantity; // registers or coils
	__u8 kind;      // IPP_VALUE_*
	__u8 unit;
	__u8 function;
	__u8 side;
	__u8 data_len;
	__u8 pad[3];
	// Registers (2 bytes each, big-endian as on the wire) or coils (bit i
	// of byte i / 8 = coil start + i): unmapped ones zeroed. 256 bytes so
	// that both arrays are 8-byte aligned; at most IPP_VALUE_DATA used.
	__u8 data[256];
	// Bit i of byte i / 8: register or coil start + i is mapped.
	__u8 mask[256];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, IPP_VALUE_RING);
} ipp_values SEC(".maps");

// Per socket of a configured port (socket local storage: created at its
// first payload, freed with the socket, no table to fill or evict): what
// its client sent first, and the Modbus requests awaiting their reply.
struct ipp_pending {
	__u64 sent_ns; // 0: free
	__u16 tid;     // MBAP transaction identifier
	__u8 unit;
	__u8 function; // bit 7: the request covers mapped addresses
	__u16 start;   // its first address and quantity (value capture)
	__u16 quantity;
};

#define IPP_WANTED 0x80

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
static __always_inline void remember(struct ipp_sock *st, __u32 side, __u16 tid, __u8 unit, __u8 function, __u64 now,
				     __u16 start, __u16 quantity)
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
	p->start = start;
	p->quantity = quantity;
}

// A reply: its pending request, or IPP_PENDING.
static __always_inline __u32 find(struct ipp_sock *st, __u16 tid, __u8 unit, __u8 function)
{
	__u32 at = IPP_PENDING;
#pragma unroll
	for (__u32 i = 0; i < IPP_PENDING; i++) {
		struct ipp_pending *p = &st->pending[i];
		if (p->sent_ns && p->tid == tid && p->unit == unit && (p->function & 0x7f) == function)
			at = i;
	}
	return at;
}

static __always_inline __u64 chunk_bits(struct ipp_tag_key *k, __u32 chunk)
{
	k->chunk = chunk;
	__u64 *m = bpf_map_lookup_elem(&ipp_tags, k);
	return m ? *m : 0;
}

// The mapped bits of the 64 addresses from addr on (bit i: addr + i).
static __always_inline __u64 mapped_from(struct ipp_tag_key *k, __u32 addr)
{
	if (ipp_discover)
		return ~0ULL;
	__u32 sh = addr & 63;
	__u64 bits = chunk_bits(k, addr >> 6) >> sh;
	if (sh)
		bits |= chunk_bits(k, (addr >> 6) + 1) << (64 - sh);
	return bits;
}

// The table a function reads or writes, or -1.
static __always_inline int table_of(__u8 function)
{
	switch (function) {
	case 1:
	case 5:
	case 15:
		return IPP_TABLE_COIL;
	case 2:
		return IPP_TABLE_DISCRETE_INPUT;
	case 3:
	case 6:
	case 16:
		return IPP_TABLE_HOLDING;
	case 4:
		return IPP_TABLE_INPUT;
	}
	return -1;
}

// Whether any address in [start, start + quantity) of (side, unit, table)
// is mapped (quantity at most 2000: 33 windows of 64). A global function:
// the verifier checks it once, not at every call site of the unrolled
// ADU loop.
__attribute__((noinline)) int any_mapped(__u32 side, __u32 unit, __u32 table, __u32 start, __u32 quantity)
{
	struct ipp_tag_key k = { .side = side, .unit = unit, .table = table };
	start &= 0xffff;
	for (__u32 g = 0; g < 33; g++) {
		if (g * 64 >= quantity)
			break;
		__u64 bits = mapped_from(&k, start + g * 64);
		__u32 left = quantity - g * 64;
		if (left < 64)
			bits &= (1ULL << left) - 1;
		if (bits)
			return 1;
	}
	return 0;
}

// Fields of an ADU for capture(), packed into scalars: a global function
// takes at most 5 arguments, and scalars load on every kernel with BTF.
#define ADU_FIELDS(tid, start, quantity, kind, unit)                                                        \
	((__u64)(tid) | (__u64)(start) << 16 | (__u64)(quantity) << 32 | (__u64)(kind) << 48 | (__u64)(unit) << 56)
#define ADU_MORE(function, side, coil_value, request) \
	((__u64)(function) | (__u64)(side) << 8 | (__u64)(coil_value) << 16 | (__u64)(request) << 24)

// 4 register mask bits -> the 8 data bytes of those registers (LE load).
static __always_inline __u64 register_bytes(__u64 m)
{
	return (m & 1) * 0xffffULL | ((m >> 1) & 1) * 0xffff0000ULL | ((m >> 2) & 1) * 0xffff00000000ULL |
	       ((m >> 3) & 1) * 0xffff000000000000ULL;
}

// One value event: the ADU's data (data_len bytes at data_off of the skb),
// unmapped registers and coils zeroed, with the mask of the mapped ones.
// A full ring is counted, never waited for. Global: verified once.
__attribute__((noinline)) int capture(struct __sk_buff *skb, __u64 now, __u64 where, __u64 fields, __u64 more)
{
	__u32 data_off = where >> 32;
	__u64 len = where & 0xff; // 64-bit: the verifier keeps its bounds
	__u16 tid = fields, start = fields >> 16, quantity = fields >> 32;
	__u8 kind = fields >> 48, unit = fields >> 56;
	__u8 function = more, side = more >> 8, coil_value = more >> 16, request = more >> 24;
	if (!skb)
		return 0;
	struct ipp_value *ev = bpf_ringbuf_reserve(&ipp_values, sizeof(*ev), 0);
	if (!ev) {
		add(IPP_CELL_VALUE_LOST, 1);
		return 0;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = now;
	ev->cookie = bpf_get_socket_cookie(skb);
	// The server: the end with the protocol's port (the destination of a
	// request). Headers as inspect() checked them.
	__u8 h[40] = {};
	__u32 l4 = 0;
	if (bpf_skb_load_bytes(skb, 0, h, 20) == 0 && (h[0] >> 4) == 4) {
		ev->server[10] = 0xff;
		ev->server[11] = 0xff;
		if (request)
			__builtin_memcpy(ev->server + 12, h + 16, 4);
		else
			__builtin_memcpy(ev->server + 12, h + 12, 4);
		l4 = (h[0] & 0xf) * 4;
	} else if (bpf_skb_load_bytes(skb, 0, h, 40) == 0) {
		if (request)
			__builtin_memcpy(ev->server, h + 24, 16);
		else
			__builtin_memcpy(ev->server, h + 8, 16);
		l4 = 40;
	}
	__u8 ports[4] = {};
	if (l4 && bpf_skb_load_bytes(skb, l4 & 0x3f, ports, 4) == 0) {
		__u16 sport = (__u16)ports[0] << 8 | ports[1], dport = (__u16)ports[2] << 8 | ports[3];
		ev->server_port = request ? dport : sport;
	}
	ev->tid = tid;
	ev->start = start;
	ev->quantity = quantity;
	ev->kind = kind;
	ev->unit = unit;
	ev->function = function;
	ev->side = side;
	if (kind == IPP_VALUE_WRITE_OK || kind == IPP_VALUE_WRITE_FAILED) {
		bpf_ringbuf_submit(ev, 0);
		return 0;
	}
	if (function == 5) {
		ev->data[0] = coil_value;
		len = 1;
	} else {
		// 1..256 by arithmetic, then at most IPP_VALUE_DATA: verifiers
		// before 6.x do not learn "not 0" from a comparison with 0, and
		// the helper refuses a size that may be 0 (a length of 0 wraps
		// to 256 and is refused below).
		len = ((len - 1) & 0xff) + 1;
		if (len > IPP_VALUE_DATA || bpf_skb_load_bytes(skb, data_off, ev->data, len)) {
			bpf_ringbuf_discard(ev, 0);
			return 0;
		}
	}
	ev->data_len = len;
	int table = table_of(function);
	struct ipp_tag_key k = { .side = side, .unit = unit, .table = table < 0 ? 0 : table };
	__u64 *mask = (__u64 *)ev->mask;
	__u64 *data = (__u64 *)ev->data;
	// The mask, 64 addresses at a time.
	for (__u32 g = 0; g < 32; g++) {
		if (g * 64 >= quantity)
			break;
		__u64 bits = mapped_from(&k, (__u32)start + g * 64);
		__u32 left = quantity - g * 64;
		if (left < 64)
			bits &= (1ULL << left) - 1;
		mask[g] = bits;
	}
	if (table == IPP_TABLE_COIL || table == IPP_TABLE_DISCRETE_INPUT) {
		for (__u32 g = 0; g < 32; g++)
			data[g] &= mask[g];
	} else {
		// 4 registers per 8 data bytes: 125 registers in 32 steps.
		for (__u32 g = 0; g < 32; g++)
			data[g] &= register_bytes(mask[g >> 4] >> ((g & 15) * 4));
	}
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

static __always_inline void bad(__u32 reason)
{
	add(IPP_CELL_VALUE_BAD + reason, 1);
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
		// The PDU's fields after the function code (value capture).
		__u8 f[8] = {};
		int whole = off + 6 + len <= skb->len;
		if (ipp_capture) {
			// Constant sizes: the verifier loses a computed length's
			// bounds on the way to the helper. Requests need 4 or 5
			// bytes, read replies 1 (the byte count).
			if (off + 13 <= skb->len)
				bpf_skb_load_bytes(skb, off + 8, f, 5);
			else if (off + 12 <= skb->len)
				bpf_skb_load_bytes(skb, off + 8, f, 4);
			else if (off + 9 <= skb->len)
				bpf_skb_load_bytes(skb, off + 8, f, 1);
		}
		if (request) {
			add(fn_cell(side, function, IPP_FN_REQUESTS), 1);
			__u16 start = (__u16)f[0] << 8 | f[1];
			__u16 quantity = (__u16)f[2] << 8 | f[3];
			if (function == 5 || function == 6)
				quantity = 1;
			int table = table_of(function);
			__u8 flag = 0;
			if (ipp_capture && table >= 0 && len >= 6 && quantity >= 1 && quantity <= 2000 &&
			    any_mapped(side, h[6], table, start, quantity))
				flag = IPP_WANTED;
			remember(st, side, tid, h[6], function | flag, now, start, quantity);
			if (flag && function >= 5) {
				// A write: its values now, its outcome with the reply.
				__u64 fields = ADU_FIELDS(tid, start, quantity, IPP_VALUE_WRITE, h[6]);
				if (!whole) {
					bad(IPP_BAD_PARTIAL);
				} else if (function == 5) {
					if ((f[2] == 0xff || f[2] == 0) && f[3] == 0 && len == 6)
						capture(skb, now, 1, fields, ADU_MORE(function, side, f[2] ? 1 : 0, 1));
					else
						bad(IPP_BAD_VALUE);
				} else if (function == 6) {
					if (len == 6)
						capture(skb, now, (__u64)(off + 10) << 32 | 2, fields, ADU_MORE(function, side, 0, 1));
					else
						bad(IPP_BAD_LENGTH);
				} else {
					__u32 want = function == 15 ? (quantity + 7) / 8 : quantity * 2;
					if (f[4] == want && len == 7 + want && want <= 246)
						capture(skb, now, (__u64)(off + 13) << 32 | want, fields, ADU_MORE(function, side, 0, 1));
					else
						bad(IPP_BAD_LENGTH);
				}
			}
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
				if (p->function & IPP_WANTED) {
					if (function >= 5) {
						__u8 kind = (h[7] & 0x80) ? IPP_VALUE_WRITE_FAILED : IPP_VALUE_WRITE_OK;
						capture(skb, now, 0, ADU_FIELDS(tid, p->start, p->quantity, kind, h[6]),
							ADU_MORE(function, side, 0, 0));
					} else if (!(h[7] & 0x80)) {
						__u32 want = function <= 2 ? ((__u32)p->quantity + 7) / 8 : (__u32)p->quantity * 2;
						if (!whole)
							bad(IPP_BAD_PARTIAL);
						else if (f[0] == want && len == 3 + want && want <= 250)
							capture(skb, now, (__u64)(off + 9) << 32 | want,
								ADU_FIELDS(tid, p->start, p->quantity, IPP_VALUE_READ, h[6]),
								ADU_MORE(function, side, 0, 0));
						else
							bad(IPP_BAD_LENGTH);
					}
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
