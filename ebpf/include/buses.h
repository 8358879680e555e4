/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/* Shared constants of buses.bpf.c. edge-agent/src/probe/buses.rs mirrors
 * them; a unit test there parses this file so the two cannot drift. */
#ifndef BUSES_H
#define BUSES_H

/* Bus kinds: the first field of a series key. */
#define BUS_I2C 0    /* i2c:i2c_read/i2c_write ... i2c:i2c_result, per transfer */
#define BUS_SMBUS 1  /* smbus:smbus_read/smbus_write ... smbus:smbus_result */
#define BUS_SPI 2    /* spi:spi_message_start ... spi:spi_message_done */
#define BUS_REGMAP 3 /* regmap:regmap_hw_{read,write}_{start,done} */
#define BUS_KINDS 4

/* Operations. An i2c transfer with any read message is a read (a register
 * read is a write of the register number, then a read). */
#define BUS_OP_READ 0
#define BUS_OP_WRITE 1
#define BUS_OP_TRANSFER 2 /* spi: full duplex */

/* Latency histogram: log2 buckets of microseconds, as device_io.h. */
#define BUS_BUCKETS 24

/* A regmap's name (its device's name: "0-0050", "spi0.0"), NUL-padded. */
#define BUS_NAME_LEN 32

#define BUS_MAX_SERIES 128 /* (kind, bus, target, op, name) */
#define BUS_MAX_ERRS 64    /* (kind, bus, target, errno) */
#define BUS_MAX_GPIO 256   /* gpio line numbers */
/* In flight: i2c and SMBus transfers hold their adapter's lock, so one
 * record per adapter number (below BUS_ADAPTERS; others are not timed);
 * SPI messages by address, regmap accesses by thread (LRU hashes: a
 * record whose end was never seen is pushed out, never leaks). */
#define BUS_ADAPTERS 64
#define BUS_MAX_INFLIGHT 256

/* errno for an SPI message that moved fewer bytes than it framed. */
#define BUS_ERR_SHORT 0

/* GPIO counters per line. */
#define GPIO_GET_LOW 0
#define GPIO_GET_HIGH 1
#define GPIO_SET_LOW 2
#define GPIO_SET_HIGH 3
#define GPIO_DIR_IN 4
#define GPIO_DIR_OUT 5
#define GPIO_DIR_ERR 6
#define GPIO_COUNTERS 7

#define BUS_STAT_SERIES_FULL 0   /* an operation not counted: series cap */
#define BUS_STAT_ERRS_FULL 1     /* an error not counted by errno: cap */
#define BUS_STAT_GPIO_FULL 2     /* a GPIO event not counted: line cap */
#define BUS_STAT_UNTIMED 3       /* an end whose start was not seen (adapter >= BUS_ADAPTERS, or attached mid-operation) */
#define BUS_STATS 4

#endif
