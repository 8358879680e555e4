//! The BR2_EXTERNAL tree in buildroot/: Buildroot cannot download its
//! sources here, so instead of a build this checks what a build would trip
//! over: names, paths, the package's cargo settings, the defconfigs'
//! references, and that the overlay and kernel fragment are the very files
//! the emulated board (hil-tests/image.sh) uses and that the agent accepts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tree() -> PathBuf {
    e2e::repo_dir().join("buildroot")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The tree's name from external.desc (`name: EDGE_AGENT`).
fn external_name() -> String {
    let desc = read(&tree().join("external.desc"));
    let name = desc.lines().find_map(|l| l.strip_prefix("name:")).expect("external.desc has no name").trim();
    assert!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
        "external.desc name {name:?}: Buildroot wants [A-Z0-9_]"
    );
    name.to_owned()
}

/// Every file of the tree, relative paths.
fn files() -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(&tree(), &tree(), &mut out);
    out.sort();
    out
}

#[test]
fn every_external_path_reference_names_this_tree_and_exists() {
    let name = external_name();
    let var = format!("BR2_EXTERNAL_{name}_PATH");
    let mut refs = 0;
    for f in files() {
        let text = read(&tree().join(&f));
        for (i, _) in text.match_indices("BR2_EXTERNAL_") {
            let rest = &text[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            assert_eq!(&rest[..end], var, "{} refers to {} but the tree is named {name}", f.display(), &rest[..end]);
            // The path after the variable must exist in the tree (skipping
            // wildcard includes and the checkout's parent).
            let after = rest[end..].trim_start_matches(')').trim_start_matches('}');
            let path: String = after.chars().take_while(|c| !matches!(c, '"' | ' ' | '\n' | ')' | '*')).collect();
            if path.starts_with('/') && !after.starts_with("/..") && !after[path.len()..].starts_with('*') {
                assert!(
                    tree().join(&path[1..]).exists(),
                    "{} refers to {var}{path}, which does not exist",
                    f.display()
                );
                refs += 1;
            }
        }
    }
    assert!(refs >= 5, "only {refs} path references checked");
}

#[test]
fn packages_are_sourced_and_follow_the_cargo_infrastructure() {
    let name = external_name();
    let top = read(&tree().join("Config.in"));
    let mk = read(&tree().join("external.mk"));
    assert!(mk.contains(&format!("$(BR2_EXTERNAL_{name}_PATH)/package/*/*.mk")), "external.mk includes no package");
    let packages: BTreeSet<String> = files()
        .iter()
        .filter(|f| f.starts_with("package") && f.components().count() == 3)
        .map(|f| f.components().nth(1).unwrap().as_os_str().to_string_lossy().into_owned())
        .collect();
    assert!(packages.contains("edge-agent"), "no edge-agent package: {packages:?}");
    for pkg in &packages {
        let upper = pkg.to_uppercase().replace('-', "_");
        let config = tree().join("package").join(pkg).join("Config.in");
        assert!(
            top.contains(&format!("source \"$BR2_EXTERNAL_{name}_PATH/package/{pkg}/Config.in\"")),
            "Config.in does not source package/{pkg}/Config.in"
        );
        assert!(
            read(&config).contains(&format!("config BR2_PACKAGE_{upper}\n")),
            "{} defines no BR2_PACKAGE_{upper}",
            config.display()
        );
        let mk_path = tree().join("package").join(pkg).join(format!("{pkg}.mk"));
        let mk = read(&mk_path);
        // Buildroot derives the variable prefix from the file name.
        for line in mk.lines().filter(|l| !l.starts_with('#') && !l.starts_with('\t') && l.contains(" = ")) {
            let var = line.split_whitespace().next().unwrap();
            assert!(var.starts_with(&format!("{upper}_")), "{}: {var} lacks the {upper}_ prefix", mk_path.display());
        }
        assert!(
            mk.trim_end().ends_with("$(eval $(cargo-package))"),
            "{pkg}.mk does not end with the cargo-package eval"
        );
    }

    // The agent package builds the crate named in SUBDIR, which has the
    // binary the init script starts.
    let mk = read(&tree().join("package/edge-agent/edge-agent.mk"));
    let var = |v: &str| -> String {
        mk.lines()
            .find_map(|l| l.strip_prefix(&format!("{v} = ")))
            .unwrap_or_else(|| panic!("edge-agent.mk sets no {v}"))
            .trim()
            .to_owned()
    };
    assert_eq!(var("EDGE_AGENT_SITE"), format!("$(BR2_EXTERNAL_{name}_PATH)/.."));
    assert_eq!(var("EDGE_AGENT_SITE_METHOD"), "local");
    let crate_dir = e2e::repo_dir().join(var("EDGE_AGENT_SUBDIR"));
    let manifest = read(&crate_dir.join("Cargo.toml"));
    assert!(manifest.contains("name = \"edge-agent\""), "SUBDIR is not the edge-agent crate");
    assert!(crate_dir.join("src/main.rs").exists(), "the edge-agent crate has no binary");
    assert!(var("EDGE_AGENT_CARGO_BUILD_OPTS").contains("--bin edge-agent"));
    let version = e2e::repo_dir().join("Cargo.toml");
    assert!(
        read(&version).contains(&format!("version = \"{}\"", var("EDGE_AGENT_VERSION"))),
        "EDGE_AGENT_VERSION differs from the workspace version"
    );
    // build.rs reads the variables the package passes.
    let build_rs = read(&crate_dir.join("build.rs"));
    for env in ["BPF_CLANG", "BPF_EXTRA_CFLAGS"] {
        assert!(mk.contains(&format!("{env}=")) && build_rs.contains(&format!("\"{env}\"")), "{env} not passed/read");
    }
}

#[test]
fn defconfigs_use_the_overlay_the_fragment_and_the_package() {
    let name = external_name();
    let overlay = format!("BR2_ROOTFS_OVERLAY=\"$(BR2_EXTERNAL_{name}_PATH)/board/edge/rootfs-overlay\"");
    let fragment = format!(
        "BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES=\"$(BR2_EXTERNAL_{name}_PATH)/board/edge/linux-probes.fragment\""
    );
    let defconfigs: Vec<PathBuf> = files().into_iter().filter(|f| f.starts_with("configs")).collect();
    let names: Vec<String> = defconfigs.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n.contains("aarch64")), "no aarch64 defconfig: {names:?}");
    assert!(
        names.contains(&"edge_qemu_riscv64_virt_defconfig".to_string()),
        "no qemu_riscv64_virt defconfig: {names:?}"
    );
    for f in &defconfigs {
        let text = read(&tree().join(f));
        assert!(f.to_string_lossy().ends_with("_defconfig"), "{}: Buildroot lists only *_defconfig", f.display());
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            assert!(line.starts_with("BR2_") && line.contains('='), "{}: not a config line: {line}", f.display());
        }
        for want in [&overlay, &fragment, &"BR2_PACKAGE_EDGE_AGENT=y".to_string(), &"BR2_PACKAGE_LIBBPF=y".to_string()]
        {
            assert!(text.lines().any(|l| l == want), "{} lacks {want}", f.display());
        }
        // Rust's std needs threads; the agent's package depends on them.
        assert!(
            text.contains("BR2_TOOLCHAIN_BUILDROOT_GLIBC=y") || text.contains("BR2_TOOLCHAIN_BUILDROOT_MUSL=y"),
            "{}: no C library chosen",
            f.display()
        );
    }
}

#[test]
fn overlay_and_fragment_are_what_the_board_uses_and_the_agent_accepts() {
    let overlay = tree().join("board/edge/rootfs-overlay");
    let script = overlay.join("etc/init.d/S50edge-agent");
    let meta = std::fs::metadata(&script).expect("the init script");
    assert!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0, "S50edge-agent not executable");
    let ok = Command::new("sh").arg("-n").arg(&script).status().unwrap();
    assert!(ok.success(), "S50edge-agent: shell syntax error");
    let text = read(&script);
    // cargo install --root $(TARGET_DIR)/usr puts the binary in /usr/bin.
    assert!(text.contains("DAEMON=/usr/bin/edge-agent"), "the init script starts another binary");
    let conf = text.lines().find_map(|l| l.strip_prefix("CONFIG=")).expect("CONFIG= in the init script");
    let conf_file = overlay.join(conf.trim_start_matches('/'));
    assert!(conf_file.exists(), "the init script's config {conf} is not in the overlay");

    // The agent accepts the overlay's config as it is, once the device is
    // provisioned: check-config reads the TLS files the config names, so
    // they are made here (scripts/fleet-certs.sh, as provisioning would)
    // and the config's /etc/edge-agent/tls/ points at them. Nothing on
    // this machine's /etc is needed.
    let agent = e2e::bin_dir().join("edge-agent");
    if agent.exists() {
        let dir = e2e::tempdir("overlay-config");
        let (pki, tls) = (dir.join("pki"), dir.join("tls"));
        let certs = e2e::repo_dir().join("scripts/fleet-certs.sh");
        for args in [&["ca"][..], &["device", "edge-device"][..]] {
            let ok = Command::new(&certs).arg(&pki).args(args).status().unwrap();
            assert!(ok.success(), "fleet-certs.sh {args:?}");
        }
        std::fs::create_dir_all(&tls).unwrap();
        for (from, to) in
            [("ca.crt", "ca.crt"), ("devices/edge-device.crt", "device.crt"), ("devices/edge-device.key", "device.key")]
        {
            std::fs::copy(pki.join(from), tls.join(to)).unwrap_or_else(|e| panic!("{from}: {e}"));
        }
        let text = read(&conf_file);
        assert!(
            text.contains("\"/etc/edge-agent/tls/"),
            "the overlay's config names no TLS files under /etc/edge-agent/tls"
        );
        let provisioned = dir.join("agent.toml");
        std::fs::write(&provisioned, text.replace("\"/etc/edge-agent/tls/", &format!("\"{}/", tls.display()))).unwrap();
        let out = Command::new(&agent).args(["check-config", "--config"]).arg(&provisioned).output().unwrap();
        assert!(
            out.status.success(),
            "edge-agent check-config {}: {}",
            conf_file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    } else if std::env::var_os("CI").is_some() {
        panic!("edge-agent binary missing (cargo build --workspace --bins)");
    }

    // The fragment asks for every option docs/probes.md names, and only =y.
    let fragment = read(&tree().join("board/edge/linux-probes.fragment"));
    let options: BTreeSet<&str> = fragment
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            assert!(l.ends_with("=y"), "fragment line {l:?}: only built-in options (=y)");
            l.trim_end_matches("=y")
        })
        .collect();
    let docs = read(&e2e::repo_dir().join("docs/probes.md"));
    let req = &docs[docs.find("## Kernel requirements").expect("docs/probes.md: Kernel requirements")..];
    let req = &req[..req[3..].find("\n## ").map_or(req.len(), |i| i + 3)];
    for (i, _) in req.match_indices("CONFIG_") {
        let opt: String = req[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if opt == "CONFIG_DEBUG_INFO_BTF" || opt == "CONFIG_EVENT_TRACING" {
            continue; // not needed; selected by the tracing options
        }
        assert!(options.contains(opt.as_str()), "docs/probes.md requires {opt}; the fragment lacks it");
    }

    // The emulated board is built from these same files.
    let image = read(&e2e::repo_dir().join("hil-tests/image.sh"));
    for used in ["buildroot/board/edge/rootfs-overlay/.", "buildroot/board/edge/linux-probes.fragment"] {
        assert!(image.contains(used), "hil-tests/image.sh does not use {used}");
    }
}
