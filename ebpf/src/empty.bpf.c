// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Programs that do nothing, for benchmarks only (edge-agent/benches/devices.rs):
// the cost floor of a syscall tracepoint hook, against which the device
// probe's added cost per unrelated system call is reported.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("tracepoint/syscalls/sys_enter_read")
int empty_enter(void *ctx)
{
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_read")
int empty_exit(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
