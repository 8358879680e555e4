//! The operator's MQTT connection, for the commands that publish retained
//! documents (`rollout`, `certificates sign`): the `[mqtt]` section of the
//! bridge's config with the operator's certificate (CN fleet-admin in the
//! shipped ACL, configs/mosquitto/acl-central).

use crate::config::Config;
use std::time::{Duration, Instant};

/// Publishes retained payloads as the operator (`[mqtt]` of the config:
/// the operator's certificate) and reads retained ones.
pub struct Operator {
    client: rumqttc::Client,
    conn: rumqttc::Connection,
}

impl Operator {
    pub fn connect(cfg: &Config, what: &str) -> Result<Operator, String> {
        let m = &cfg.mqtt;
        let mut opts = rumqttc::MqttOptions::new(format!("{}-{what}", m.client_id), m.host.clone(), m.port);
        // Model messages are the largest it sends or reads.
        let max = edge_wire::MODEL_MESSAGE_MAX_BYTES + 64 * 1024;
        opts.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_max_packet_size(max, max);
        crate::secure(m, &mut opts).map_err(|e| e.to_string())?;
        let (client, conn) = rumqttc::Client::new(opts, 16);
        Ok(Operator { client, conn })
    }

    /// The retained message of `topic`, if any (waits a second for it).
    pub fn retained(&mut self, topic: &str) -> Result<Option<Vec<u8>>, String> {
        self.client.subscribe(topic, rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut subscribed_at = None;
        let mut found = None;
        while Instant::now() < deadline {
            match self.conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))) => {
                    refused(&a, topic)?;
                    subscribed_at = Some(Instant::now())
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) if p.topic == topic => {
                    found = Some(p.payload.to_vec());
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("broker: {e}")),
                Err(_) => {}
            }
            if subscribed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                break;
            }
        }
        let _ = self.client.unsubscribe(topic);
        Ok(found)
    }

    /// Publishes retained (QoS 1) and waits for the broker's PUBACK.
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.send(topic, payload, true)
    }

    /// Publishes once, not retained (QoS 1: to the sessions there now).
    pub fn publish_once(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.send(topic, payload, false)
    }

    fn send(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => return Ok(()),
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err(format!("broker: {e}")),
            }
        }
        Err(format!("no PUBACK for {topic} within 10 s"))
    }

    /// Every retained message under `filter` (a wildcard filter): what
    /// comes until `quiet` passes with nothing new after the subscription
    /// was acknowledged (retained messages come right after it).
    pub fn retained_all(&mut self, filter: &str, quiet: Duration) -> Result<Vec<(String, Vec<u8>)>, String> {
        self.client.subscribe(filter, rumqttc::QoS::AtLeastOnce).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        let mut found = Vec::new();
        loop {
            match self.conn.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))) => {
                    refused(&a, filter)?;
                    last = Some(Instant::now())
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) if p.retain => {
                    found.push((p.topic.clone(), p.payload.to_vec()));
                    last = Some(Instant::now());
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) => return Err(format!("broker: {e}")),
            }
            match last {
                Some(t) if t.elapsed() >= quiet => break,
                None if Instant::now() > deadline => return Err(format!("no answer to the subscription to {filter}")),
                _ => {}
            }
        }
        let _ = self.client.unsubscribe(filter);
        Ok(found)
    }
}

/// A subscription the broker refused is an error: reading nothing would
/// look like nothing retained.
fn refused(ack: &rumqttc::SubAck, filter: &str) -> Result<(), String> {
    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
        return Err(format!(
            "the broker refused the subscription to {filter}: the operator's identity needs read on it \
             (configs/mosquitto/acl-central)"
        ));
    }
    Ok(())
}
