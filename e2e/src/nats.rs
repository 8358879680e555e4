//! A three-node NATS cluster on loopback with configs/nats/node.conf (TLS
//! everywhere, the users of scripts/nats-users.sh), as the fleet's
//! clustered broker: devices speak MQTT to any node, bridges pull from
//! JetStream (docs/scaling.md).

use crate::{certs_in, free_port, repo_dir, wait_for, which, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct NatsCluster {
    /// ca.crt, mqtt-clients-ca.crt, bridge.{crt,key}, admin.{crt,key},
    /// nodes/<name>.{crt,key}, devices/<id>.{crt,key}.
    pub pki: PathBuf,
    pub nodes: Vec<NatsNode>,
    dir: PathBuf,
}

pub struct NatsNode {
    pub name: String,
    /// NATS clients (bridges).
    pub client_port: u16,
    /// MQTT clients (devices).
    pub mqtt_port: u16,
    pub route_port: u16,
    /// Monitoring (/healthz).
    pub http_port: u16,
    pub proc: Option<Proc>,
}

impl NatsCluster {
    /// Three nodes, every device of `devices` with a certificate and a user.
    pub fn start(dir: &Path, devices: &[String]) -> NatsCluster {
        let dir = dir.join("nats");
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("nats dir");
        certs_in(&pki, &["ca"]);
        certs_in(&pki, &["bridge"]);
        certs_in(&pki, &["admin"]);
        let nodes: Vec<NatsNode> = (1..=3)
            .map(|i| NatsNode {
                name: format!("nats-{i}"),
                client_port: free_port(),
                mqtt_port: free_port(),
                route_port: free_port(),
                http_port: free_port(),
                proc: None,
            })
            .collect();
        for n in &nodes {
            certs_in(&pki, &["node", &n.name]);
        }
        let mut c = NatsCluster { pki, nodes, dir };
        c.add_devices(devices);
        for i in 0..c.nodes.len() {
            c.restart(i);
        }
        c.wait_healthy();
        c
    }

    /// Certificates for these devices (made in parallel) and users.conf
    /// listing them (scripts/nats-users.sh); running nodes reload it.
    pub fn add_devices(&mut self, devices: &[String]) {
        crate::device_certs(&self.pki, devices);
        let mut ids: Vec<String> = std::fs::read_dir(self.pki.join("devices"))
            .map(|d| {
                d.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".crt").map(str::to_owned)).collect()
            })
            .unwrap_or_default();
        ids.sort();
        let out = Command::new(repo_dir().join("scripts/nats-users.sh")).args(&ids).output().expect("nats-users.sh");
        assert!(out.status.success(), "nats-users.sh: {}", String::from_utf8_lossy(&out.stderr));
        for n in &mut self.nodes {
            let dir = self.dir.join(&n.name);
            std::fs::create_dir_all(&dir).expect("node dir");
            std::fs::write(dir.join("users.conf"), &out.stdout).expect("users.conf");
            if let Some(p) = &mut n.proc {
                p.signal(libc::SIGHUP);
            }
        }
    }

    /// Starts node `i` (again: same ports, same JetStream directory).
    pub fn restart(&mut self, i: usize) {
        let base = std::fs::read_to_string(repo_dir().join("configs/nats/node.conf")).expect("configs/nats/node.conf");
        let routes: Vec<String> =
            self.nodes.iter().map(|n| format!("    \"nats-route://127.0.0.1:{}\"", n.route_port)).collect();
        let n = &self.nodes[i];
        let dir = self.dir.join(&n.name);
        let pki = format!("{}/", self.pki.display());
        let node_files = format!("{}/nodes/{}.", self.pki.display(), n.name);
        let mut text = base
            .replace("/etc/nats/edge/node.", &node_files)
            .replace("/etc/nats/edge/", &pki)
            .replace("/var/lib/nats/edge", &dir.join("jetstream").display().to_string())
            .replace("\nport: 4222\n", &format!("\nlisten: \"127.0.0.1:{}\"\n", n.client_port))
            .replace("\n  port: 8883\n", &format!("\n  listen: \"127.0.0.1:{}\"\n", n.mqtt_port))
            .replace("\n  port: 6222\n", &format!("\n  listen: \"127.0.0.1:{}\"\n", n.route_port))
            .replace("\nhttp: \"127.0.0.1:8222\"\n", &format!("\nhttp: \"127.0.0.1:{}\"\n", n.http_port));
        // `include "users.conf"` is relative to the config: the node's dir.
        let shipped_routes: Vec<String> = (1..=3).map(|k| format!("    \"nats-route://nats-{k}:6222\"")).collect();
        text = text.replace(&shipped_routes.join("\n"), &routes.join("\n"));
        assert_eq!(text.matches("127.0.0.1:").count(), 4 + routes.len(), "listeners of the shipped config not found");
        let conf = dir.join("node.conf");
        std::fs::write(&conf, text).expect("node config");
        let bin = which("nats-server").expect("nats-server");
        let proc = Proc::spawn(
            &n.name,
            &self.dir,
            &bin,
            &["-c".into(), conf.display().to_string()],
            &[("NATS_SERVER_NAME", &n.name)],
        );
        let port = n.mqtt_port;
        let mut proc = proc;
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            proc.assert_running();
            std::net::TcpStream::connect(("127.0.0.1", port))
        });
        self.nodes[i].proc = Some(proc);
    }

    /// SIGKILL node `i`: what it had not written is gone (JetStream keeps
    /// the replicas on the others).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Until every running node says it is healthy (JetStream current).
    pub fn wait_healthy(&mut self) {
        for n in &mut self.nodes {
            let Some(p) = &mut n.proc else { continue };
            let url = format!("http://127.0.0.1:{}/healthz", n.http_port);
            wait_for(&format!("{} to be healthy", n.name), Duration::from_secs(60), || {
                p.assert_running();
                match ureq::get(&url).call() {
                    Ok(r) if r.status() == 200 => Ok(()),
                    Ok(r) => Err(format!("{}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            });
        }
    }

    /// `[mqtt]` keys and `[mqtt.tls]` for device `id` on node `node`.
    pub fn device_toml(&self, node: usize, id: &str) -> String {
        let base = self.pki.join("devices").join(id);
        format!(
            "host = \"127.0.0.1\"\nport = {}\nprotocol = \"3.1.1\"\n[mqtt.tls]\nenabled = true\nca_file = \"{}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.nodes[node % self.nodes.len()].mqtt_port,
            self.pki.join("ca.crt").display(),
            base.with_extension("crt").display(),
            base.with_extension("key").display()
        )
    }

    /// The operator's `[mqtt]` table (CN=fleet-admin, on node `node`'s MQTT
    /// listener), for `fleet-bridge certificates sign` and `rollout`.
    pub fn operator_toml(&self, node: usize) -> String {
        format!(
            "[mqtt]\nclient_id = \"fleet-admin\"\nhost = \"127.0.0.1\"\nport = {}\n[mqtt.tls]\nenabled = true\n\
             ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            self.nodes[node % self.nodes.len()].mqtt_port,
            self.pki.join("ca.crt").display(),
            self.pki.join("admin.crt").display(),
            self.pki.join("admin.key").display()
        )
    }

    /// MQTT 3.1.1 options for a test's own client on node `node` with
    /// device `id`'s certificate (or the bridge's: `id` = "fleet-bridge";
    /// the operator's: "fleet-admin").
    pub fn mqtt_options(&self, node: usize, client_id: &str, id: &str) -> rumqttc::MqttOptions {
        let base = match id {
            "fleet-bridge" => self.pki.join("bridge"),
            "fleet-admin" => self.pki.join("admin"),
            _ => self.pki.join("devices").join(id),
        };
        let tls = edge_wire::tls::TlsConfig {
            enabled: true,
            ca_file: self.pki.join("ca.crt"),
            cert_file: base.with_extension("crt"),
            key_file: base.with_extension("key"),
        };
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", self.nodes[node % self.nodes.len()].mqtt_port);
        let cfg = tls.client_config().expect("test TLS files");
        o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg)));
        o
    }

    /// A bridge's `[jetstream]` table (every node, the bridge certificate)
    /// with `more` keys.
    pub fn bridge_toml(&self, more: &str) -> String {
        let servers: Vec<String> =
            self.nodes.iter().map(|n| format!("\"tls://127.0.0.1:{}\"", n.client_port)).collect();
        format!(
            "[jetstream]\nservers = [{}]\n{more}\n[jetstream.tls]\nenabled = true\nca_file = \"{}\"\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            servers.join(", "),
            self.pki.join("ca.crt").display(),
            self.pki.join("bridge.crt").display(),
            self.pki.join("bridge.key").display()
        )
    }

    pub fn log_text(&self) -> String {
        self.nodes.iter().filter_map(|n| n.proc.as_ref()).map(Proc::log_text).collect::<Vec<_>>().join("\n")
    }
}
