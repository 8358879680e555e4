/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Shared constants of tcp_lifecycle.bpf.c. edge-agent/src/probe/tcp_lifecycle.rs
 * mirrors them; a unit test there parses this file so the two cannot drift. */
#ifndef TCP_LIFECYCLE_H
#define TCP_LIFECYCLE_H

#define TCPL_KIND_OPENED 0
#define TCPL_KIND_FAILED 1
#define TCPL_KIND_CLOSED 2
#define TCPL_KINDS 3

#define TCPL_DIR_OUT 0
#define TCPL_DIR_IN 1
#define TCPL_DIR_UNKNOWN 2
#define TCPL_DIRS 3

#define TCPL_CLASSES 16
#define TCPL_COUNTERS 144 /* TCPL_KINDS * TCPL_DIRS * TCPL_CLASSES */

#define TCPL_STAT_SOCK_MAP_FULL 0
#define TCPL_STATS 1

#define TCPL_MAX_PORTS 256
#define TCPL_MAX_SOCKS 65536

#define TCPL_IPPROTO_TCP 6

/* Largest tracepoint record prefix the program copies. */
#define TCPL_REC_MAX 128

/* include/net/tcp_states.h */
#define TCPL_ESTABLISHED 1
#define TCPL_SYN_SENT 2
#define TCPL_SYN_RECV 3
#define TCPL_CLOSE 7
#define TCPL_LISTEN 10

#endif
