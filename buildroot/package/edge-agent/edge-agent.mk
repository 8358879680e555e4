################################################################################
#
# edge-agent
#
################################################################################

# Built from the checkout this BR2_EXTERNAL tree lives in.
EDGE_AGENT_VERSION = 0.1.0
EDGE_AGENT_SITE = $(BR2_EXTERNAL_EDGE_AGENT_PATH)/..
EDGE_AGENT_SITE_METHOD = local
EDGE_AGENT_LICENSE = Apache-2.0
EDGE_AGENT_SUBDIR = edge-agent

# The kernel side (ebpf/*.bpf.c) is compiled for the BPF target by
# edge-agent/build.rs, with libbpf's headers (bpf/bpf_helpers.h) and the
# kernel's UAPI headers from staging. The compiler is the build machine's
# clang (any clang >= 11 with the BPF backend, as distributions ship it):
# Buildroot's host-clang builds only the target's backend. Override with
# EDGE_AGENT_BPF_CLANG.
EDGE_AGENT_BPF_CLANG ?= clang
EDGE_AGENT_DEPENDENCIES = libbpf
EDGE_AGENT_CARGO_ENV = \
	BPF_CLANG=$(EDGE_AGENT_BPF_CLANG) \
	BPF_EXTRA_CFLAGS="-I$(STAGING_DIR)/usr/include"
EDGE_AGENT_CARGO_BUILD_OPTS = --bin edge-agent
EDGE_AGENT_CARGO_INSTALL_OPTS = --bin edge-agent

# A local site skips the download step, where the cargo infrastructure
# vendors the crates; fetch them here instead (needs the network once, then
# cargo's cache in $(BR_CARGO_HOME)).
define EDGE_AGENT_FETCH_CRATES
	cd $(@D)/$(EDGE_AGENT_SUBDIR) && $(PKG_CARGO_ENV) cargo fetch --locked
endef
EDGE_AGENT_PRE_BUILD_HOOKS += EDGE_AGENT_FETCH_CRATES

# The overlay (board/edge/rootfs-overlay) brings the init script and the
# default config; the store directory is made here so that a read-only
# rootfs with /var/lib on a writable partition works too.
define EDGE_AGENT_INSTALL_STATE_DIR
	mkdir -p $(TARGET_DIR)/var/lib/edge-agent
endef
EDGE_AGENT_POST_INSTALL_TARGET_HOOKS += EDGE_AGENT_INSTALL_STATE_DIR

$(eval $(cargo-package))
