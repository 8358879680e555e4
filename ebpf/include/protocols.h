/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Shared constants of protocols.bpf.c. edge-agent/src/probe/protocols.rs
 * mirrors them; a unit test there parses this file so the two cannot drift. */
#ifndef PROTOCOLS_H
#define PROTOCOLS_H

/* Protocols a port may be configured for (ipp_port_proto values). */
#define IPP_PROTO_NONE 0
#define IPP_PROTO_MODBUS 1
#define IPP_PROTO_MQTT 2
#define IPP_PROTO_OPCUA 3
#define IPP_PROTOS 4

/* Which end of the connection the socket is: the client sends to the
 * protocol's port, the server listens on it. */
#define IPP_SIDE_CLIENT 0
#define IPP_SIDE_SERVER 1
#define IPP_SIDES 2

/* What a connection's first payload from the client looked like. */
#define IPP_PAYLOAD_MATCHED 0 /* the protocol's opening bytes */
#define IPP_PAYLOAD_TLS 1     /* a TLS handshake record: encrypted */
#define IPP_PAYLOAD_OTHER 2   /* something else on that port */
#define IPP_PAYLOADS 3

/* Modbus function codes are 1..127 (bit 7 marks an exception reply). */
#define IPP_FUNCTIONS 128
/* Exception codes 1..15 count under their own number, others under 0. */
#define IPP_EXC_CODES 16
/* Latency histogram: log2 buckets of microseconds; bucket b < IPP_BUCKETS - 1
 * holds values below 2^(b+1) us (and at least 2^b for b > 0). */
#define IPP_BUCKETS 24
/* Modbus ADUs parsed per TCP segment (pipelined requests). */
#define IPP_MAX_ADUS 4

/* Cells (u64) of the ipp_cells array, which the agent maps into memory.
 * conn[proto][side][payload]: connections by their first client payload. */
#define IPP_CELL_CONN 0
/* per (side, function): requests, then the latency sum (us), then the
 * buckets of the replies matched to a request. */
#define IPP_FN_REQUESTS 0
#define IPP_FN_SUM_US 1
#define IPP_FN_BUCKET0 2
#define IPP_FN_CELLS 26 /* 2 + IPP_BUCKETS */
#define IPP_CELL_FN 32  /* IPP_PROTOS * IPP_SIDES * IPP_PAYLOADS = 24, rounded up */
/* exc[side][function][code] */
#define IPP_CELL_EXC 6688 /* IPP_CELL_FN + IPP_SIDES * IPP_FUNCTIONS * IPP_FN_CELLS */
/* Per side: replies no pending request matched (the request went before
 * the probe attached, or was given up), then requests given up without a
 * reply (their transaction id used again, or pushed out by
 * IPP_PENDING newer requests still pending on the socket). */
#define IPP_CELL_UNMATCHED 10784 /* IPP_CELL_EXC + IPP_SIDES * IPP_FUNCTIONS * IPP_EXC_CODES */
#define IPP_CELL_ABANDONED 10786
/* Process values (docs/process-values.md): value events lost because the
 * ring was full, and ADUs with mapped registers that could not be read,
 * by reason (IPP_BAD_*). */
#define IPP_CELL_VALUE_LOST 10788
#define IPP_CELL_VALUE_BAD 10789
#define IPP_BAD_LENGTH 0  /* counts and lengths disagree */
#define IPP_BAD_PARTIAL 1 /* the ADU continues in the next segment */
#define IPP_BAD_VALUE 2   /* write single coil with neither FF00 nor 0000 */
#define IPP_BADS 3
#define IPP_CELLS 10792

/* Modbus requests awaiting their reply, per socket. */
#define IPP_PENDING 8

/* TCP payload bytes (per CPU), by flow (IPP_FLOW_*) and the TCP probe's
 * port class: slot flow * IPP_CLASSES + class. */
#define IPP_FLOW_SENT 0
#define IPP_FLOW_RECEIVED 1
#define IPP_CLASSES 16
#define IPP_BYTE_SLOTS 32

/* Modbus tables (ipp_tag_key.table). */
#define IPP_TABLE_COIL 0
#define IPP_TABLE_DISCRETE_INPUT 1
#define IPP_TABLE_HOLDING 2
#define IPP_TABLE_INPUT 3

/* Value events (struct ipp_value.kind). */
#define IPP_VALUE_READ 0         /* a read's reply: what the server returned */
#define IPP_VALUE_WRITE 1        /* a write request: what the client sent */
#define IPP_VALUE_WRITE_OK 2     /* the normal reply to a captured write */
#define IPP_VALUE_WRITE_FAILED 3 /* an exception reply to a captured write */
/* Data bytes of an event: 125 registers or 2000 coils read (250 bytes),
 * 123 registers or 1968 coils written (246). */
#define IPP_VALUE_DATA 252
/* The value events' ring (bytes, a power of two). */
#define IPP_VALUE_RING (256 * 1024)

/* ipp_sock.payload before the client's first bytes were seen. */
#define IPP_PAYLOAD_UNSEEN 255

#endif
