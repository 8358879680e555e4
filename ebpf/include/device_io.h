/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Shared constants of device_io.bpf.c. edge-agent/src/probe/device_io.rs
 * mirrors them; a unit test there parses this file so the two cannot drift. */
#ifndef DEVICE_IO_H
#define DEVICE_IO_H

/* Operations on a watched device file. */
#define DIO_OP_READ 0  /* read, pread64, readv */
#define DIO_OP_WRITE 1 /* write, pwrite64, writev */
#define DIO_OP_IOCTL 2
#define DIO_OP_OPEN 3  /* openat of a watched path */
#define DIO_OPS 4
/* Not an operation counted: dup2/dup3 of a watched descriptor, whose new
 * number is registered on exit. */
#define DIO_OP_DUP 4

/* Latency histogram: log2 buckets of microseconds; bucket b < DIO_BUCKETS - 1
 * holds values below 2^(b+1) us (and at least 2^b for b > 0). */
#define DIO_BUCKETS 24

#define DIO_COMM_LEN 16
/* Longest watched path (with its NUL) the open hook can match. */
#define DIO_PATH_MAX 128

#define DIO_MAX_DEVICES 128
#define DIO_MAX_PATHS 512  /* watched paths: each device's names and links */
#define DIO_MAX_FDS 4096   /* open watched files, (tgid, fd) */
#define DIO_MAX_INFLIGHT 256 /* threads inside a watched operation whose slot another holds */
/* (device, process) series; each has DIO_OPS aggregates in a per-CPU
 * array, at (series - 1) * DIO_OPS + op. */
#define DIO_MAX_SERIES 64
#define DIO_MAX_AGG (DIO_MAX_SERIES * DIO_OPS)
#define DIO_MAX_ERRS 256   /* (series, op, errno) */

/* The reject filter: one byte per (tgid mod DIO_PID_SLOTS) and per
 * (fd mod DIO_FD_SLOTS), nonzero when some watched file may match. Then one
 * in-flight record per (tid mod DIO_TID_SLOTS): the watched operation that
 * thread is inside (a thread whose slot another holds goes to a hash). */
#define DIO_PID_SLOTS 4096
#define DIO_FD_SLOTS 1024
#define DIO_TID_SLOTS 1024

#define DIO_STAT_FDS_FULL 0      /* a watched open could not be remembered */
#define DIO_STAT_INFLIGHT_FULL 1 /* an operation could not be timed */
#define DIO_STAT_AGG_FULL 2      /* an operation not counted: series cap (its file has no series) */
#define DIO_STAT_ERRS_FULL 3     /* an error not counted by errno: series cap */
#define DIO_STAT_FDS_ADDED 4     /* watched descriptors registered by the open hook */
#define DIO_STAT_STALE 5         /* an exit found its thread's record of another call: dropped */
#define DIO_STAT_SPILLED 6       /* an operation timed in the hash: its thread slot was held */
#define DIO_STATS 9

/* Serial bytes of devices read as Modbus RTU (docs/process-values.md): the
 * bytes one read() or write() moved, at most DIO_BYTES per event (more are
 * cut and counted: DIO_STAT_BYTES_CUT), into the ring dio_bytes. */
#define DIO_BYTES 512
#define DIO_BYTES_RING (256 * 1024)
#define DIO_MAX_BUFS 256 /* threads inside a captured read/write at once */
#define DIO_STAT_BYTES_LOST 7 /* an event the full ring could not take */
#define DIO_STAT_BYTES_CUT 8  /* a read/write of more than DIO_BYTES */

/* Largest tracepoint record prefix a program copies. */
#define DIO_REC_MAX 48

#endif
