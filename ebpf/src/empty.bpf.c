// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Programs that do nothing, for benchmarks only: the cost floor of a
// syscall tracepoint hook, against which the device probe's added cost per
// unrelated system call is reported (edge-agent/benches/devices.rs), and of
// a cgroup_skb hook, for the protocol probe (benches/protocols.rs).

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

SEC("cgroup_skb/ingress")
int empty_skb_ingress(struct __sk_buff *skb)
{
	return 1; // let it pass
}

SEC("cgroup_skb/egress")
int empty_skb_egress(struct __sk_buff *skb)
{
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
