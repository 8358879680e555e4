/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Shared constants of tcp_lifecycle.bpf.c. edge-agent/src/probe/tcp_lifecycle.rs
 * mirrors them; a unit test there parses this file so the two cannot drift. */
#ifndef TCP_LIFECYCLE_H
#define TCP_LIFECYCLE_H

/* Counter kinds: one u64 each in a tcpl_counters value. */
#define TCPL_KIND_OPENED 0
#define TCPL_KIND_FAILED 1   /* handshake never completed (refused included) */
#define TCPL_KIND_CLOSED 2
#define TCPL_KIND_REFUSED 3  /* outbound handshake ended by a reset */
#define TCPL_KIND_RETRANS 4  /* retransmitted segments (skbs) */
#define TCPL_KIND_RST_SENT 5
#define TCPL_KIND_RST_RECV 6
#define TCPL_KIND_CW_ENTERED 7 /* the peer closed, our application not yet... */
#define TCPL_KIND_CW_LEFT 8    /* ...until it did: the difference is a gauge */
#define TCPL_KINDS 9

#define TCPL_DIR_OUT 0
#define TCPL_DIR_IN 1
#define TCPL_DIR_UNKNOWN 2
#define TCPL_DIRS 3

#define TCPL_CLASSES 16
/* tcpl_counters keys: dir * TCPL_CLASSES + class. */
#define TCPL_SLOTS 48 /* TCPL_DIRS * TCPL_CLASSES */

/* Histograms: log2 buckets; bucket b < TCPL_BUCKETS - 1 holds values below
 * 2^(b+1) units (and at least 2^b for b > 0); the last holds the rest. */
#define TCPL_HIST_CONNECT_US 0  /* SYN_SENT -> ESTABLISHED, microseconds */
#define TCPL_HIST_DURATION_MS 1 /* ESTABLISHED -> CLOSE, milliseconds */
#define TCPL_HIST_RTT_US 2      /* smoothed RTT per received segment, microseconds */
#define TCPL_HIST_CWND 3        /* congestion window per received segment, segments */
#define TCPL_HISTS 4
#define TCPL_BUCKETS 24
/* tcpl_hist keys: (hist * 2 + dir) * TCPL_CLASSES + class, dir out or in. */
#define TCPL_HIST_SLOTS 128

#define TCPL_STAT_SOCK_MAP_FULL 0
#define TCPL_STAT_SOCKS_ADDED 1   /* tcpl_socks entries created... */
#define TCPL_STAT_SOCKS_REMOVED 2 /* ...and deleted: the difference is its fill */
#define TCPL_STATS 3

#define TCPL_MAX_PORTS 256
#define TCPL_MAX_SOCKS 65536

/* Peer allowlist: remote addresses in configured prefixes get the name of
 * their group (1..TCPL_PEERS-1), the rest are 0, "other". */
#define TCPL_PEERS 16
#define TCPL_MAX_PEER_PREFIXES 64
#define TCPL_PEER_KIND_OPENED 0
#define TCPL_PEER_KIND_FAILED 1
#define TCPL_PEER_KIND_REFUSED 2
#define TCPL_PEER_KIND_CLOSED 3
#define TCPL_PEER_KINDS 4
/* tcpl_peer_counters keys: dir * TCPL_PEERS + peer, dir out or in. */
#define TCPL_PEER_SLOTS 32

#define TCPL_AF_INET 2
#define TCPL_AF_INET6 10

#define TCPL_IPPROTO_TCP 6

/* Largest tracepoint record prefix a program copies. */
#define TCPL_REC_MAX 160

/* include/net/tcp_states.h */
#define TCPL_ESTABLISHED 1
#define TCPL_SYN_SENT 2
#define TCPL_SYN_RECV 3
#define TCPL_CLOSE 7
#define TCPL_CLOSE_WAIT 8
#define TCPL_LISTEN 10

/* tcpl_sock.flags */
#define TCPL_SOCK_RST_RECEIVED 1

#endif
