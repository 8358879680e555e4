#!/bin/sh
# The arm64 board's bus exercise (init runs it once the agent's bus probes
# are attached): i2c transfers and SMBus reads to absent chips, SPI writes
# and reads through spidev, reads of a GPIO line through sysfs, and an
# at24 EEPROM bound and unbound (its probe's test reads go through regmap).
# Before it, six SIGHUP reloads that detach and attach the bus programs.
# The ground truth is the kernel's own record of the same tracepoints
# (ftrace, enabled only for the exercise); one line for the test:
#   hil: buses: i2c=N i2c_enxio=N smbus=N spi=N spi_bytes=N gpio_value=N
#               gpio_line7_get=N gpio_direction=N regmap_read=N lost=N
t=/sys/kernel/tracing
[ -d $t/events ] || mount -t tracefs tracefs $t
bus=$(ls -d /sys/bus/i2c/devices/i2c-* 2>/dev/null | head -1)
spidev=$(ls /dev/spidev* 2>/dev/null | head -1)
chip=$(grep -l pl061 /sys/class/gpio/gpiochip*/label 2>/dev/null | head -1)
if [ -z "$bus" ] || [ -z "$spidev" ] || [ -z "$chip" ]; then
	echo "hil: buses: missing i2c adapter ($bus), spidev ($spidev) or PL061 ($chip)"
	exit 1
fi
nr=${bus##*i2c-}

# Waits until the agent's /metrics says probe $1 is attached ($2 = 1) or
# not (0); two minutes at most.
probe_is() {
	i=0
	until wget -q -O - http://127.0.0.1:9464/metrics 2>/dev/null | grep -q "^edge_agent_probe_attached{probe=\"$1\"} $2"; do
		i=$((i + 1))
		[ $i -gt 120 ] && { echo "hil: buses: the agent's $1 probe never became $2"; exit 1; }
		sleep 1
	done
}
# The agent's bus probes must be attached before anything moves.
probe_is regmap 1

# Reload cycles first (SIGHUP with the GPIO family off, then on again):
# each detaches every probe, bus programs included, and attaches anew; the
# agent must hold exactly the BPF and perf descriptors it held before.
pid=$(pidof edge-agent | cut -d' ' -f1)
conf=/etc/edge-agent/agent.toml
bpf_fds() { ls -l "/proc/$pid/fd" 2>/dev/null | grep -cE 'bpf|perf_event'; }
before=$(bpf_fds)
cp "$conf" /tmp/agent.toml.orig
for c in 1 2 3; do
	{ cat /tmp/agent.toml.orig; printf '\n[probes.buses]\ngpio = false\n'; } > "$conf"
	kill -HUP "$pid"
	probe_is gpio 0
	cp /tmp/agent.toml.orig "$conf"
	kill -HUP "$pid"
	probe_is gpio 1
done
# The reload's last probe (regmap) attached too.
probe_is regmap 1
echo "hil: reload: cycles=6 pid=$pid now=$(pidof edge-agent | cut -d' ' -f1) bpf_fds_before=$before bpf_fds_after=$(bpf_fds)"

echo 8192 > $t/buffer_size_kb
echo > $t/trace
for e in i2c/i2c_result smbus/smbus_result spi/spi_message_done gpio/gpio_value gpio/gpio_direction \
	regmap/regmap_hw_read_done regmap/regmap_hw_write_done; do
	echo 1 > $t/events/$e/enable
done
echo 1 > $t/tracing_on

# i2c: 5 SMBus byte reads (emulated as one i2c transfer each) and 3 raw
# write-then-read transfers, all to addresses where no chip answers.
for i in 1 2 3 4 5; do i2cget -y "$nr" 0x48 0x00 b >/dev/null 2>&1; done
for i in 1 2 3; do i2ctransfer -y "$nr" w1@0x49 0x10 r2 >/dev/null 2>&1; done
# SPI: 3 writes of 4 bytes, 2 reads of 8.
for i in 1 2 3; do printf 'abcd' > "$spidev"; done
for i in 1 2; do dd if="$spidev" of=/dev/null bs=8 count=1 2>/dev/null; done
# GPIO: line 7 of the PL061 as an input, read 10 times.
base=$(cat "${chip%/label}/base")
g=$((base + 7))
echo $g > /sys/class/gpio/export
echo in > /sys/class/gpio/gpio$g/direction
for i in 1 2 3 4 5 6 7 8 9 10; do cat /sys/class/gpio/gpio$g/value >/dev/null; done
echo $g > /sys/class/gpio/unexport
# regmap: an at24 EEPROM at 0x50; no chip there, so its probe's test
# read (regmap over i2c, retried for 25 ms) fails and it unbinds.
echo 24c02 0x50 > "$bus/new_device"
echo 0x50 > "$bus/delete_device"

echo 0 > $t/tracing_on
for e in i2c/i2c_result smbus/smbus_result spi/spi_message_done gpio/gpio_value gpio/gpio_direction \
	regmap/regmap_hw_read_done regmap/regmap_hw_write_done; do
	echo 0 > $t/events/$e/enable
done
cat $t/trace > /tmp/buses.trace
n() { grep -c "$1" /tmp/buses.trace; }
spi_bytes=$(grep ' spi_message_done:' /tmp/buses.trace | sed -n 's/.* len=\([0-9]*\)\/.*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
lost=$(cat $t/per_cpu/cpu*/stats | awk '/^(overrun|dropped events):/ { s += $NF } END { print s + 0 }')
echo "hil: buses: i2c=$(n ' i2c_result:') i2c_enxio=$(n ' i2c_result:.* ret=-6') smbus=$(n ' smbus_result:')" \
	"spi=$(n ' spi_message_done:') spi_bytes=$spi_bytes gpio_value=$(n ' gpio_value:')" \
	"gpio_line7_get=$(n " gpio_value: $g get") gpio_direction=$(n ' gpio_direction:')" \
	"regmap_read=$(n ' regmap_hw_read_done: 0-0050') regmap_write=$(n ' regmap_hw_write_done:') lost=$lost gpio_base=$base"
