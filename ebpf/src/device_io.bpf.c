// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Device-file I/O (serial ports, i2c-dev, spidev, gpiochip, IIO sysfs and any
// other watched file) from the classic syscall tracepoints, filtered in the
// kernel to watched open files.
//
// A watched file is a (tgid, fd) pair in dio_fds. Pairs come from two places:
// the open hook (sys_enter/exit_openat) matches the opened path against
// dio_paths, which the agent fills with every name of every watched device;
// the agent adds files opened before it started, inherited or duplicated,
// from a scan of /proc/<pid>/fd. close() removes a pair; the agent removes
// those of exited processes.
//
// Every read/write/ioctl of every process on the box reaches these programs,
// so the reject path is two byte loads from one mmapable array (dio_filter):
// is any watched file held by a process whose tgid falls in this slot, and
// has any watched file a descriptor number in this slot? Only when both say
// maybe does the program look up the hash. A watched operation is timed in
// its thread's slot of the same array (no map update, no atomics); the exit
// hook's reject path is one load of that slot's thread id, and of the count
// of operations that went to the hash because another thread held the slot.
//
// Portable like tcp_lifecycle.bpf.c: no vmlinux.h, no CO-RE; the offsets of
// `fd`, `filename` and `ret` come from the tracefs format files at start-up.
//
// Aggregated in the kernel per (device, operation, process name): count,
// bytes, errors, a log2 latency histogram; errors also by errno. A
// (device, process name) pair is a series, numbered once when a watched
// file is found (dio_series); the file's entry carries the number, so a
// watched operation's exit indexes a per-CPU array instead of hashing a
// key. User space reads the maps once per window. No events, no wake-ups.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "log2.h"

#include "device_io.h"

// First syscall argument (the fd, or openat's dfd: filename is the second).
const volatile __u32 off_fd = 16;
// read/write: the buffer (second argument).
const volatile __u32 off_buf = 24;
const volatile __u32 off_filename = 24;
// dup2/dup3: the descriptor duplicated.
const volatile __u32 off_oldfd = 16;
// sys_exit_*: the return value.
const volatile __u32 off_ret = 16;
// Every hook: the system call's number (0: the records have none; the exit
// then does not check that it ends the call its record began).
const volatile __u32 off_nr = 8;

struct dio_file {
	__u32 dev;
	// 1 + the series of (dev, process name when the file was found);
	// 0: none (more pairs than DIO_MAX_SERIES), not counted.
	__u32 series;
};

// A thread inside a watched operation.
struct dio_op {
	__u32 tid; // in a slot: 0 when free
	__u32 op;
	__u64 start_ns;
	struct dio_file file;
	__s32 nr; // the system call it began
	__u32 pad;
};

struct dio_filter {
	__u8 pid[DIO_PID_SLOTS];
	__u8 fd[DIO_FD_SLOTS];
	__u32 spilled; // operations in dio_inflight now
	__u32 pad;
	struct dio_op slot[DIO_TID_SLOTS];
};

// One element, mmapped by the agent: it sets and clears filter bytes with
// plain stores, so neither side's writes can undo the other's.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct dio_filter);
} dio_filter SEC(".maps");

// (tgid << 32 | fd) -> watched file.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIO_MAX_FDS);
	__type(key, __u64);
	__type(value, struct dio_file);
} dio_fds SEC(".maps");

struct dio_path {
	char path[DIO_PATH_MAX];
};

// Watched path (NUL-padded) -> device index.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIO_MAX_PATHS);
	__type(key, struct dio_path);
	__type(value, __u32);
} dio_paths SEC(".maps");

// Thread id -> the watched operation it is inside, when another thread's
// operation holds its slot.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIO_MAX_INFLIGHT);
	__type(key, __u32);
	__type(value, struct dio_op);
} dio_inflight SEC(".maps");

struct dio_series_key {
	__u32 dev;
	char comm[DIO_COMM_LEN];
};

// (device, process name) -> 1 + its series number. The programs and the
// agent's /proc scan both add entries.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIO_MAX_SERIES);
	__type(key, struct dio_series_key);
	__type(value, __u32);
} dio_series SEC(".maps");

// Series numbers not handed out yet (1 + number; the agent fills it at
// load). A queue pops atomically, on any kernel with BPF: fetch-and-add
// on a shared counter needs 5.12's atomics, which Jetson's 5.10 lacks.
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, DIO_MAX_SERIES);
	__type(value, __u32);
} dio_series_free SEC(".maps");

struct dio_agg {
	__u64 ops;
	__u64 bytes;
	__u64 errors;
	__u64 sum_us;
	__u64 buckets[DIO_BUCKETS];
};

// (series - 1) * DIO_OPS + op -> the aggregate.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DIO_MAX_AGG);
	__type(key, __u32);
	__type(value, struct dio_agg);
} dio_agg SEC(".maps");

struct dio_err_key {
	__u32 series; // 1 + series number
	__u32 op;
	__u32 err; // errno, positive
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, DIO_MAX_ERRS);
	__type(key, struct dio_err_key);
	__type(value, __u64);
} dio_errs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DIO_STATS);
	__type(key, __u32);
	__type(value, __u64);
} dio_stats SEC(".maps");

// Devices whose bytes are captured (Modbus RTU tags): 1 at the device's
// index. Written by the agent.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DIO_MAX_DEVICES);
	__type(key, __u32);
	__type(value, __u32);
} dio_capture SEC(".maps");

// Thread id -> the user buffer of its captured read or write in flight.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DIO_MAX_BUFS);
	__type(key, __u32);
	__type(value, __u64);
} dio_bufs SEC(".maps");

struct dio_bytes_event {
	__u64 ts_ns; // bpf_ktime_get_ns when the call returned
	__u32 dev;
	__u32 tgid;
	__u16 len; // bytes in data
	__u8 op;   // DIO_OP_READ or DIO_OP_WRITE
	__u8 pad[5];
	__u8 data[DIO_BYTES];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, DIO_BYTES_RING);
} dio_bytes SEC(".maps");

static __always_inline void stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&dio_stats, &idx);
	if (v)
		*v += 1;
}

// A u64 of the tracepoint record at a load-time constant offset. The
// verifier allows context reads only at offsets fixed in the instruction;
// the frozen globals make the usual offsets such branches, and any other
// layout goes through a helper.
static __always_inline __u64 rec_u64(void *ctx, __u32 off)
{
	if (off == 16)
		return *(__u64 *)((char *)ctx + 16);
	if (off == 24)
		return *(__u64 *)((char *)ctx + 24);
	__u64 v = 0;
	if (off <= DIO_REC_MAX - 8)
		bpf_probe_read_kernel(&v, sizeof(v), (char *)ctx + off);
	return v;
}

static __always_inline struct dio_filter *filter(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&dio_filter, &zero);
}

// The system call's number, from the record (every syscall tracepoint
// has one, at 8 on every kernel seen).
static __always_inline __s32 rec_nr(void *ctx)
{
	if (off_nr == 8)
		return *(__s32 *)((char *)ctx + 8);
	__s32 v = 0;
	if (off_nr && off_nr <= DIO_REC_MAX - 4)
		bpf_probe_read_kernel(&v, sizeof(v), (char *)ctx + off_nr);
	return v;
}

// Times the operation in the thread's slot. Only this thread frees or
// takes its own slot back; another thread whose tid shares the slot sees
// it held and goes to the hash. (Two such threads starting in the same
// instant on two CPUs could both take a free slot: the later write wins
// and the other's exit finds no record, an operation not counted. Slots
// are tid mod 1024, so this needs two threads 1024 apart in watched
// calls at once.)
static __always_inline void begin(void *ctx, struct dio_filter *f, __u32 tid, struct dio_file *file, __u32 op)
{
	struct dio_op *s = &f->slot[tid % DIO_TID_SLOTS];
	__u32 holder = s->tid;
	if (holder == 0 || holder == tid) {
		s->tid = tid;
		s->op = op;
		s->nr = rec_nr(ctx);
		__builtin_memcpy(&s->file, file, sizeof(s->file));
		s->start_ns = bpf_ktime_get_ns();
		return;
	}
	struct dio_op o = { .tid = tid, .op = op, .nr = rec_nr(ctx) };
	__builtin_memcpy(&o.file, file, sizeof(o.file));
	o.start_ns = bpf_ktime_get_ns();
	if (bpf_map_update_elem(&dio_inflight, &tid, &o, BPF_ANY) != 0) {
		stat(DIO_STAT_INFLIGHT_FULL);
		return;
	}
	stat(DIO_STAT_SPILLED);
	__sync_fetch_and_add(&f->spilled, 1);
}

// The watched file behind the descriptor at `off` of the record, if any:
// the reject path is the two filter bytes.
static __always_inline struct dio_file *watched_file(void *ctx, __u32 off, struct dio_filter *f, __u64 id)
{
	__u32 tgid = id >> 32;
	if (!f || !f->pid[tgid % DIO_PID_SLOTS])
		return 0;
	__u32 fd = (__u32)rec_u64(ctx, off);
	if (!f->fd[fd % DIO_FD_SLOTS])
		return 0;
	__u64 key = ((__u64)tgid << 32) | fd;
	return bpf_map_lookup_elem(&dio_fds, &key);
}

// sys_enter of read/write/ioctl-like calls (and dup2/dup3): the watched
// file behind the descriptor at `off` of the record, timed until exit.
static __always_inline int enter_fd(void *ctx, __u32 off, __u32 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct dio_filter *f = filter();
	struct dio_file *file = watched_file(ctx, off, f, id);
	if (!file || !f)
		return 0;
	begin(ctx, f, (__u32)id, file, op);
	return 0;
}

// read(2) and write(2) of a captured device also remember the buffer,
// which the exit copies (the bytes that moved).
static __always_inline int enter_buf(void *ctx, __u32 op)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct dio_filter *f = filter();
	struct dio_file *file = watched_file(ctx, off_fd, f, id);
	if (!file || !f)
		return 0;
	__u32 dev = file->dev;
	__u32 *capture = bpf_map_lookup_elem(&dio_capture, &dev);
	if (capture && *capture) {
		__u32 tid = (__u32)id;
		__u64 buf = rec_u64(ctx, off_buf);
		bpf_map_update_elem(&dio_bufs, &tid, &buf, BPF_ANY);
	}
	begin(ctx, f, (__u32)id, file, op);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_read")
int dio_enter_read(void *ctx)
{
	return enter_buf(ctx, DIO_OP_READ);
}

SEC("tracepoint/syscalls/sys_enter_write")
int dio_enter_write(void *ctx)
{
	return enter_buf(ctx, DIO_OP_WRITE);
}

// pread64, readv, pwrite64, writev: counted, bytes not captured.
SEC("tracepoint/syscalls/sys_enter_pread64")
int dio_enter_readx(void *ctx)
{
	return enter_fd(ctx, off_fd, DIO_OP_READ);
}

SEC("tracepoint/syscalls/sys_enter_pwrite64")
int dio_enter_writex(void *ctx)
{
	return enter_fd(ctx, off_fd, DIO_OP_WRITE);
}

SEC("tracepoint/syscalls/sys_enter_ioctl")
int dio_enter_ioctl(void *ctx)
{
	return enter_fd(ctx, off_fd, DIO_OP_IOCTL);
}

// A shell's `< /dev/ttyUSB0`, dd and daemons move a device onto another
// descriptor number: the new number is watched too.
SEC("tracepoint/syscalls/sys_enter_dup3")
int dio_enter_dup(void *ctx)
{
	return enter_fd(ctx, off_oldfd, DIO_OP_DUP);
}

// The open hook: every openat on the box copies its path (at most
// DIO_PATH_MAX bytes) and looks it up; a watched path is timed like an
// operation and its descriptor registered on exit.
SEC("tracepoint/syscalls/sys_enter_openat")
int dio_enter_openat(void *ctx)
{
	struct dio_path p = {};
	const char *name = (const char *)rec_u64(ctx, off_filename);
	if (bpf_probe_read_user_str(p.path, sizeof(p.path), name) <= 0)
		return 0;
	__u32 *dev = bpf_map_lookup_elem(&dio_paths, &p);
	if (!dev)
		return 0;
	struct dio_filter *f = filter();
	if (!f)
		return 0;
	// The series is found on exit, with the descriptor.
	struct dio_file file = { .dev = *dev };
	begin(ctx, f, (__u32)bpf_get_current_pid_tgid(), &file, DIO_OP_OPEN);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_close")
int dio_enter_close(void *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct dio_filter *f = filter();
	if (!f || !f->pid[tgid % DIO_PID_SLOTS])
		return 0;
	__u32 fd = (__u32)rec_u64(ctx, off_fd);
	if (!f->fd[fd % DIO_FD_SLOTS])
		return 0;
	__u64 key = ((__u64)tgid << 32) | fd;
	bpf_map_delete_elem(&dio_fds, &key);
	// Filter bytes stay set; the agent clears stale ones.
	return 0;
}

static __always_inline __u32 log2_bucket(__u64 v)
{
	return log2_bucket_of(v, DIO_BUCKETS - 1);
}

// 1 + the series number of (dev, this process's name), handed out on first
// sight; 0 when every number is taken. A number popped for a pair that a
// racing insert (another CPU, the agent) numbered first goes back.
static __always_inline __u32 series_of(__u32 dev)
{
	struct dio_series_key k = { .dev = dev };
	bpf_get_current_comm(k.comm, sizeof(k.comm));
	__u32 *s = bpf_map_lookup_elem(&dio_series, &k);
	if (s)
		return *s;
	__u32 n = 0;
	if (bpf_map_pop_elem(&dio_series_free, &n) != 0)
		return 0;
	if (bpf_map_update_elem(&dio_series, &k, &n, BPF_NOEXIST) == 0)
		return n;
	bpf_map_push_elem(&dio_series_free, &n, 0);
	s = bpf_map_lookup_elem(&dio_series, &k);
	return s ? *s : 0;
}

static __always_inline void count_error(__u32 series, __u32 op, __s64 ret)
{
	struct dio_err_key ek = { .series = series, .op = op, .err = (__u32)(-ret) };
	__u64 *n = bpf_map_lookup_elem(&dio_errs, &ek);
	if (!n) {
		__u64 zero = 0;
		bpf_map_update_elem(&dio_errs, &ek, &zero, BPF_NOEXIST);
		n = bpf_map_lookup_elem(&dio_errs, &ek);
		if (!n) {
			stat(DIO_STAT_ERRS_FULL);
			return;
		}
	}
	*n += 1; // per-CPU value: no atomics needed
}

// A captured read or write: the bytes it moved, into the ring. Global:
// verified once.
__attribute__((noinline)) int copy_bytes(__u64 dev_op, __u64 id, __s64 ret, __u64 now)
{
	__u32 dev = (__u32)dev_op, op = dev_op >> 32;
	__u32 tid = (__u32)id, tgid = id >> 32;
	__u32 *capture = bpf_map_lookup_elem(&dio_capture, &dev);
	if (!capture || !*capture)
		return 0;
	__u64 *bufp = bpf_map_lookup_elem(&dio_bufs, &tid);
	if (!bufp)
		return 0;
	__u64 buf = *bufp;
	bpf_map_delete_elem(&dio_bufs, &tid);
	if (ret <= 0)
		return 0;
	__u64 len = ret;
	if (len > DIO_BYTES) {
		stat(DIO_STAT_BYTES_CUT);
		len = DIO_BYTES;
	}
	struct dio_bytes_event *ev = bpf_ringbuf_reserve(&dio_bytes, sizeof(*ev), 0);
	if (!ev) {
		stat(DIO_STAT_BYTES_LOST);
		return 0;
	}
	ev->ts_ns = now;
	ev->dev = dev;
	ev->tgid = tgid;
	ev->op = op;
	ev->len = 0;
	if (len >= 1 && len <= DIO_BYTES && bpf_probe_read_user(ev->data, len, (void *)buf) == 0)
		ev->len = len;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

// Every sys_exit of a hooked call (openat included).
SEC("tracepoint/syscalls/sys_exit_read")
int dio_exit(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct dio_filter *f = filter();
	if (!f)
		return 0;
	struct dio_op *s = &f->slot[tid % DIO_TID_SLOTS];
	struct dio_op o;
	if (s->tid == tid) {
		__builtin_memcpy(&o, s, sizeof(o));
		s->tid = 0;
	} else {
		if (!f->spilled)
			return 0;
		struct dio_op *h = bpf_map_lookup_elem(&dio_inflight, &tid);
		if (!h)
			return 0;
		__builtin_memcpy(&o, h, sizeof(o));
		bpf_map_delete_elem(&dio_inflight, &tid);
		__sync_fetch_and_add(&f->spilled, -1);
	}
	__u64 now = bpf_ktime_get_ns();
	if (off_nr && o.nr != rec_nr(ctx)) {
		// The record's own exit was never seen (the kernel skipped the
		// program, or it was attached mid-call): not this call's.
		stat(DIO_STAT_STALE);
		return 0;
	}
	__s64 ret = (__s64)rec_u64(ctx, off_ret);
	__u32 op = o.op;
	if (op == DIO_OP_READ || op == DIO_OP_WRITE)
		copy_bytes((__u64)op << 32 | o.file.dev, id, ret, now);
	__u32 series = o.file.series;
	__u64 us = (now - o.start_ns) / 1000;

	// An open's series is found here, failed or not (its file had none).
	if (op == DIO_OP_OPEN)
		series = series_of(o.file.dev);
	if ((op == DIO_OP_OPEN || op == DIO_OP_DUP) && ret >= 0) {
		__u32 tgid = id >> 32;
		__u64 key = ((__u64)tgid << 32) | (__u32)ret;
		struct dio_file file = { .dev = o.file.dev, .series = series };
		if (bpf_map_update_elem(&dio_fds, &key, &file, BPF_ANY) == 0) {
			// Hash entry first, filter bytes after: the agent's
			// clearing of stale bytes relies on this order.
			f->pid[tgid % DIO_PID_SLOTS] = 1;
			f->fd[(__u32)ret % DIO_FD_SLOTS] = 1;
			stat(DIO_STAT_FDS_ADDED);
		} else {
			stat(DIO_STAT_FDS_FULL);
		}
	}
	if (op >= DIO_OPS)
		return 0;
	if (series == 0 || series > DIO_MAX_SERIES) {
		stat(DIO_STAT_AGG_FULL);
		return 0;
	}
	__u32 idx = (series - 1) * DIO_OPS + op;
	struct dio_agg *a = bpf_map_lookup_elem(&dio_agg, &idx);
	if (!a)
		return 0;
	a->ops += 1;
	if (ret < 0) {
		a->errors += 1;
		count_error(series, op, ret);
	} else if (op == DIO_OP_READ || op == DIO_OP_WRITE) {
		a->bytes += ret;
	}
	a->sum_us += us;
	__u32 b = log2_bucket(us);
	if (b < DIO_BUCKETS)
		a->buckets[b] += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
