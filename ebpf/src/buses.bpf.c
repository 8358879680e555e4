// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Sensor buses seen from the kernel's own tracepoints, whatever process or
// driver drives them: i2c transfers (i2c:*), SMBus transactions (smbus:*),
// SPI messages (spi:*), GPIO line reads, writes and direction changes
// (gpio:*), and register accesses that reach the hardware through regmap
// (regmap:regmap_hw_*: most i2c and spi sensor, ADC and PMIC drivers).
// These events exist only on kernels with those subsystems (every Jetson
// and most RISC-V boards); the agent attaches each family whose
// tracepoints exist and reports the others unavailable.
//
// Portable like the other probes: no vmlinux.h, no CO-RE. Every field is
// read at an offset and of a size the agent takes from the event's tracefs
// format file at start-up and passes in as a load-time constant
// (`offset | size << 16 | signed << 24`).
//
// Aggregated in the kernel: per (kind, bus, target, operation, regmap name)
// a count, errors, bytes (regmap: registers), a log2 latency histogram
// (start event to end event); errors also by errno; per GPIO line eight
// counters. Per-CPU maps, read by the agent once per window. No events,
// no wake-ups. Every cap is counted when reached.

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "log2.h"

#include "buses.h"

// Field descriptors (0: the field is not read).
// i2c:i2c_write and i2c:i2c_read (one per message, before the transfer).
const volatile __u32 i2c_w_adapter = 0, i2c_w_msg_nr = 0, i2c_w_addr = 0, i2c_w_len = 0;
const volatile __u32 i2c_r_adapter = 0, i2c_r_msg_nr = 0, i2c_r_addr = 0, i2c_r_len = 0;
// i2c:i2c_result (once per transfer, after it).
const volatile __u32 i2c_res_adapter = 0, i2c_res_nr_msgs = 0, i2c_res_ret = 0;
// smbus:smbus_write / smbus:smbus_read (before), smbus:smbus_result (after).
const volatile __u32 smb_w_adapter = 0, smb_w_addr = 0;
const volatile __u32 smb_r_adapter = 0, smb_r_addr = 0;
const volatile __u32 smb_res_adapter = 0, smb_res_addr = 0, smb_res_rw = 0, smb_res_res = 0;
// spi:spi_message_start, spi:spi_message_done.
const volatile __u32 spi_s_msg = 0;
const volatile __u32 spi_d_bus = 0, spi_d_cs = 0, spi_d_msg = 0, spi_d_frame = 0, spi_d_actual = 0;
// gpio:gpio_value, gpio:gpio_direction.
const volatile __u32 gpio_v_gpio = 0, gpio_v_get = 0, gpio_v_value = 0;
const volatile __u32 gpio_d_gpio = 0, gpio_d_in = 0, gpio_d_err = 0;
// regmap:regmap_hw_read_done, regmap:regmap_hw_write_done (the starts
// need no field: they are matched by thread).
const volatile __u32 rm_rd_name = 0, rm_rd_count = 0;
const volatile __u32 rm_wd_name = 0, rm_wd_count = 0;

struct bus_key {
	__u32 kind;
	__u32 op;
	__u32 bus;    // i2c/SMBus adapter number, SPI bus number
	__u32 target; // i2c address, SPI chip select
	char name[BUS_NAME_LEN]; // regmap: the device's name
};

// The layout of device_io.bpf.c's struct dio_agg (the agent reads both
// with one type).
struct bus_agg {
	__u64 ops;
	__u64 bytes; // regmap: registers
	__u64 errors;
	__u64 sum_us;
	__u64 buckets[BUS_BUCKETS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, BUS_MAX_SERIES);
	__type(key, struct bus_key);
	__type(value, struct bus_agg);
} bus_agg SEC(".maps");

struct bus_err_key {
	__u32 kind;
	__u32 bus;
	__u32 target;
	__u32 err; // errno, positive; BUS_ERR_SHORT for a short SPI message
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, BUS_MAX_ERRS);
	__type(key, struct bus_err_key);
	__type(value, __u64);
} bus_errs SEC(".maps");

struct gpio_counts {
	__u64 n[GPIO_COUNTERS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, BUS_MAX_GPIO);
	__type(key, __u32);
	__type(value, struct gpio_counts);
} bus_gpio SEC(".maps");

// An i2c or SMBus transfer under way on an adapter.
struct bus_xfer {
	__u64 start_ns; // 0: none
	__u32 addr;
	__u32 op;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BUS_ADAPTERS);
	__type(key, __u32);
	__type(value, struct bus_xfer);
} bus_i2c_inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BUS_ADAPTERS);
	__type(key, __u32);
	__type(value, struct bus_xfer);
} bus_smbus_inflight SEC(".maps");

// struct spi_message address -> start.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BUS_MAX_INFLIGHT);
	__type(key, __u64);
	__type(value, __u64);
} bus_spi_inflight SEC(".maps");

// Thread -> start of its regmap hardware access.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BUS_MAX_INFLIGHT);
	__type(key, __u32);
	__type(value, __u64);
} bus_regmap_inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, BUS_STATS);
	__type(key, __u32);
	__type(value, __u64);
} bus_stats SEC(".maps");

static __always_inline void stat(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bus_stats, &idx);
	if (v)
		*v += 1;
}

// A field of the tracepoint record: 8 bytes read at its offset (the
// record's buffer is longer than any field we read), cut to its size and
// sign-extended when the field is signed. Little-endian targets only.
static __always_inline __s64 field(void *ctx, __u32 desc)
{
	__u32 size = (desc >> 16) & 0xff;
	if (size == 0 || size > 8)
		return 0;
	__u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), (char *)ctx + (desc & 0xffff));
	__u32 shift = 64 - size * 8;
	if (desc >> 24)
		return ((__s64)(v << shift)) >> shift;
	return (__s64)((v << shift) >> shift);
}

// Counts one operation that took `start_ns` .. now (untimed when 0).
static __always_inline void count(struct bus_key *k, __u64 start_ns, __u64 bytes, int failed)
{
	struct bus_agg *a = bpf_map_lookup_elem(&bus_agg, k);
	if (!a) {
		struct bus_agg zero = {};
		bpf_map_update_elem(&bus_agg, k, &zero, BPF_NOEXIST);
		a = bpf_map_lookup_elem(&bus_agg, k);
		if (!a) {
			stat(BUS_STAT_SERIES_FULL);
			return;
		}
	}
	a->ops += 1;
	if (failed)
		a->errors += 1;
	a->bytes += bytes;
	if (start_ns) {
		__u64 us = (bpf_ktime_get_ns() - start_ns) / 1000;
		a->sum_us += us;
		__u32 b = log2_bucket_of(us, BUS_BUCKETS - 1);
		if (b < BUS_BUCKETS)
			a->buckets[b] += 1;
	} else {
		stat(BUS_STAT_UNTIMED);
	}
}

static __always_inline void count_err(__u32 kind, __u32 bus, __u32 target, __u32 err)
{
	struct bus_err_key k = { .kind = kind, .bus = bus, .target = target, .err = err };
	__u64 *n = bpf_map_lookup_elem(&bus_errs, &k);
	if (!n) {
		__u64 zero = 0;
		bpf_map_update_elem(&bus_errs, &k, &zero, BPF_NOEXIST);
		n = bpf_map_lookup_elem(&bus_errs, &k);
		if (!n) {
			stat(BUS_STAT_ERRS_FULL);
			return;
		}
	}
	*n += 1;
}

// i2c: a transfer's messages are traced one by one before it starts; the
// first (msg_nr 0) opens the adapter's record. A transfer holds its
// adapter's lock, so the adapter number identifies it.
static __always_inline int i2c_msg(void *ctx, __u32 d_adapter, __u32 d_msg_nr, __u32 d_addr, __u32 d_len, __u32 read)
{
	__u32 adapter = (__u32)field(ctx, d_adapter);
	if (adapter >= BUS_ADAPTERS)
		return 0;
	struct bus_xfer *x = bpf_map_lookup_elem(&bus_i2c_inflight, &adapter);
	if (!x)
		return 0;
	if (field(ctx, d_msg_nr) == 0) {
		x->start_ns = bpf_ktime_get_ns();
		x->addr = (__u32)field(ctx, d_addr);
		x->op = BUS_OP_WRITE;
		x->bytes = 0;
	}
	if (read)
		x->op = BUS_OP_READ;
	x->bytes += (__u64)field(ctx, d_len);
	return 0;
}

SEC("tracepoint/i2c/i2c_write")
int bus_i2c_write(void *ctx)
{
	return i2c_msg(ctx, i2c_w_adapter, i2c_w_msg_nr, i2c_w_addr, i2c_w_len, 0);
}

SEC("tracepoint/i2c/i2c_read")
int bus_i2c_read(void *ctx)
{
	return i2c_msg(ctx, i2c_r_adapter, i2c_r_msg_nr, i2c_r_addr, i2c_r_len, 1);
}

// The transfer's end: `ret` is the number of messages done or -errno.
// Bytes count only for a transfer that completed every message.
SEC("tracepoint/i2c/i2c_result")
int bus_i2c_result(void *ctx)
{
	__u32 adapter = (__u32)field(ctx, i2c_res_adapter);
	__s64 ret = field(ctx, i2c_res_ret);
	__s64 nr = field(ctx, i2c_res_nr_msgs);
	struct bus_key k = { .kind = BUS_I2C, .bus = adapter };
	__u64 start = 0, bytes = 0;
	if (adapter < BUS_ADAPTERS) {
		struct bus_xfer *x = bpf_map_lookup_elem(&bus_i2c_inflight, &adapter);
		if (x && x->start_ns) {
			start = x->start_ns;
			k.target = x->addr;
			k.op = x->op;
			bytes = x->bytes;
			x->start_ns = 0;
		}
	}
	if (!start) {
		stat(BUS_STAT_UNTIMED);
		return 0; // no address to count it under
	}
	count(&k, start, ret == nr ? bytes : 0, ret < 0);
	if (ret < 0)
		count_err(BUS_I2C, adapter, k.target, (__u32)-ret);
	return 0;
}

static __always_inline int smbus_start(void *ctx, __u32 d_adapter, __u32 d_addr)
{
	__u32 adapter = (__u32)field(ctx, d_adapter);
	if (adapter >= BUS_ADAPTERS)
		return 0;
	struct bus_xfer *x = bpf_map_lookup_elem(&bus_smbus_inflight, &adapter);
	if (!x)
		return 0;
	// A process call traces both a write and a read: the first starts it.
	__u32 addr = (__u32)field(ctx, d_addr);
	if (x->start_ns && x->addr == addr)
		return 0;
	x->start_ns = bpf_ktime_get_ns();
	x->addr = addr;
	return 0;
}

SEC("tracepoint/smbus/smbus_write")
int bus_smbus_write(void *ctx)
{
	return smbus_start(ctx, smb_w_adapter, smb_w_addr);
}

SEC("tracepoint/smbus/smbus_read")
int bus_smbus_read(void *ctx)
{
	return smbus_start(ctx, smb_r_adapter, smb_r_addr);
}

// read_write: I2C_SMBUS_READ (1) or I2C_SMBUS_WRITE (0); res: 0 or -errno.
SEC("tracepoint/smbus/smbus_result")
int bus_smbus_result(void *ctx)
{
	__u32 adapter = (__u32)field(ctx, smb_res_adapter);
	__s64 res = field(ctx, smb_res_res);
	struct bus_key k = {
		.kind = BUS_SMBUS,
		.bus = adapter,
		.target = (__u32)field(ctx, smb_res_addr),
		.op = field(ctx, smb_res_rw) == 1 ? BUS_OP_READ : BUS_OP_WRITE,
	};
	__u64 start = 0;
	if (adapter < BUS_ADAPTERS) {
		struct bus_xfer *x = bpf_map_lookup_elem(&bus_smbus_inflight, &adapter);
		if (x) {
			start = x->start_ns;
			x->start_ns = 0;
		}
	}
	count(&k, start, 0, res < 0);
	if (res < 0)
		count_err(BUS_SMBUS, adapter, k.target, (__u32)-res);
	return 0;
}

SEC("tracepoint/spi/spi_message_start")
int bus_spi_start(void *ctx)
{
	__u64 msg = (__u64)field(ctx, spi_s_msg);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&bus_spi_inflight, &msg, &now, BPF_ANY);
	return 0;
}

// frame: the bytes the message framed; actual: the bytes it moved.
SEC("tracepoint/spi/spi_message_done")
int bus_spi_done(void *ctx)
{
	__u64 msg = (__u64)field(ctx, spi_d_msg);
	__u64 start = 0;
	__u64 *s = bpf_map_lookup_elem(&bus_spi_inflight, &msg);
	if (s) {
		start = *s;
		bpf_map_delete_elem(&bus_spi_inflight, &msg);
	}
	__u64 frame = (__u64)field(ctx, spi_d_frame);
	__u64 actual = (__u64)field(ctx, spi_d_actual);
	struct bus_key k = {
		.kind = BUS_SPI,
		.op = BUS_OP_TRANSFER,
		.bus = (__u32)field(ctx, spi_d_bus),
		.target = (__u32)field(ctx, spi_d_cs),
	};
	int shrt = actual < frame;
	count(&k, start, actual, shrt);
	if (shrt)
		count_err(BUS_SPI, k.bus, k.target, BUS_ERR_SHORT);
	return 0;
}

static __always_inline void gpio_count(__u32 line, __u32 which)
{
	struct gpio_counts *c = bpf_map_lookup_elem(&bus_gpio, &line);
	if (!c) {
		struct gpio_counts zero = {};
		bpf_map_update_elem(&bus_gpio, &line, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&bus_gpio, &line);
		if (!c) {
			stat(BUS_STAT_GPIO_FULL);
			return;
		}
	}
	if (which < GPIO_COUNTERS)
		c->n[which] += 1;
}

// get: 1 for a read of the line, 0 for a write; value: the level.
SEC("tracepoint/gpio/gpio_value")
int bus_gpio_value(void *ctx)
{
	__u32 line = (__u32)field(ctx, gpio_v_gpio);
	__u32 high = field(ctx, gpio_v_value) != 0;
	__u32 which = field(ctx, gpio_v_get) ? GPIO_GET_LOW + high : GPIO_SET_LOW + high;
	gpio_count(line, which);
	return 0;
}

// in: 1 for input; err: 0 or -errno.
SEC("tracepoint/gpio/gpio_direction")
int bus_gpio_direction(void *ctx)
{
	__u32 line = (__u32)field(ctx, gpio_d_gpio);
	if (field(ctx, gpio_d_err) != 0)
		gpio_count(line, GPIO_DIR_ERR);
	else
		gpio_count(line, field(ctx, gpio_d_in) ? GPIO_DIR_IN : GPIO_DIR_OUT);
	return 0;
}

static __always_inline int regmap_start(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&bus_regmap_inflight, &tid, &now, BPF_ANY);
	return 0;
}

// name: a __data_loc string (offset in the low 16 bits, length above).
static __always_inline int regmap_done(void *ctx, __u32 d_name, __u32 d_count, __u32 op)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 start = 0;
	__u64 *s = bpf_map_lookup_elem(&bus_regmap_inflight, &tid);
	if (s) {
		start = *s;
		bpf_map_delete_elem(&bus_regmap_inflight, &tid);
	}
	struct bus_key k = { .kind = BUS_REGMAP, .op = op };
	__u32 loc = (__u32)field(ctx, d_name);
	bpf_probe_read_kernel_str(k.name, sizeof(k.name), (char *)ctx + (loc & 0xffff));
	__s64 n = field(ctx, d_count);
	count(&k, start, n > 0 ? (__u64)n : 0, 0);
	return 0;
}

SEC("tracepoint/regmap/regmap_hw_read_start")
int bus_regmap_read_start(void *ctx)
{
	return regmap_start();
}

SEC("tracepoint/regmap/regmap_hw_read_done")
int bus_regmap_read_done(void *ctx)
{
	return regmap_done(ctx, rm_rd_name, rm_rd_count, BUS_OP_READ);
}

SEC("tracepoint/regmap/regmap_hw_write_start")
int bus_regmap_write_start(void *ctx)
{
	return regmap_start();
}

SEC("tracepoint/regmap/regmap_hw_write_done")
int bus_regmap_write_done(void *ctx)
{
	return regmap_done(ctx, rm_wd_name, rm_wd_count, BUS_OP_WRITE);
}

char LICENSE[] SEC("license") = "GPL";
