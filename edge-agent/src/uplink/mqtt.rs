//! One MQTT connection, MQTT 5 or 3.1.1 (rumqttc's two clients), behind
//! the few operations the uplink needs. MQTT 5 is the default: a broker
//! then says why it refused a publish (PUBACK reason code, e.g. not
//! authorized by its ACL), where 3.1.1 can only drop it.

use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{v5, Outgoing, Transport};
use std::time::Duration;

/// `mqtt.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Protocol {
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// How to connect.
pub struct Settings {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    /// Publishes in flight at most.
    pub inflight: u16,
    /// Largest message we accept from the broker.
    pub max_incoming: usize,
    /// Retained QoS 1 last will: (topic, payload).
    pub will: (String, &'static str),
    pub transport: Option<Transport>,
    pub credentials: Option<(String, String)>,
}

/// What the connection reports.
#[derive(Debug)]
pub enum Ev {
    ConnAck,
    /// A publish got this packet id.
    OutgoingPublish(u16),
    /// The broker took a publish; `refused` holds its reason when it did
    /// not accept it (MQTT 5 only).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    Other,
    Timeout,
    /// The connection failed, and why in a word
    /// ([`edge_wire::tls::connection_failure`]).
    Error {
        message: String,
        reason: &'static str,
        /// A failed TLS handshake's reason
        /// ([`edge_wire::tls::handshake_failure`]).
        tls: Option<&'static str>,
    },
    Closed,
}

pub enum Conn {
    V311(rumqttc::Client, Box<rumqttc::Connection>),
    V5(v5::Client, Box<v5::Connection>),
}

impl Conn {
    pub fn open(protocol: Protocol, s: Settings, cap: usize) -> Conn {
        match protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_keep_alive(s.keep_alive)
                    .set_clean_session(true)
                    .set_inflight(s.inflight)
                    .set_max_packet_size(s.max_incoming, edge_wire::MAX_PACKET_BYTES)
                    .set_last_will(rumqttc::LastWill::new(s.will.0, s.will.1, rumqttc::QoS::AtLeastOnce, true));
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = s.credentials {
                    o.set_credentials(u, p);
                }
                let (c, conn) = rumqttc::Client::new(o, cap);
                Conn::V311(c, Box::new(conn))
            }
            Protocol::V5 => {
                let mut o = v5::MqttOptions::new(s.client_id, s.host, s.port);
                o.set_keep_alive(s.keep_alive)
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(s.inflight)
                    .set_max_packet_size(Some(s.max_incoming as u32))
                    .set_last_will(m5::LastWill::new(s.will.0, s.will.1, v5::mqttbytes::QoS::AtLeastOnce, true, None));
                if let Some(t) = s.transport {
                    o.set_transport(t);
                }
                if let Some((u, p)) = s.credentials {
                    o.set_credentials(u, p);
                }
                let (c, conn) = v5::Client::new(o, cap);
                Conn::V5(c, Box::new(conn))
            }
        }
    }

    /// Queues a publish; false when the request queue is full.
    pub fn publish(&self, topic: &str, qos1: bool, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Conn::V311(c, _) => {
                let qos = if qos1 { rumqttc::QoS::AtLeastOnce } else { rumqttc::QoS::AtMostOnce };
                c.try_publish(topic, qos, retain, payload).is_ok()
            }
            Conn::V5(c, _) => {
                let qos = if qos1 { v5::mqttbytes::QoS::AtLeastOnce } else { v5::mqttbytes::QoS::AtMostOnce };
                c.try_publish(topic, qos, retain, payload).is_ok()
            }
        }
    }

    /// Subscribes to `topics` at QoS 0.
    pub fn subscribe(&self, topics: &[String]) -> bool {
        match self {
            Conn::V311(c, _) => c
                .try_subscribe_many(
                    topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), rumqttc::QoS::AtMostOnce)),
                )
                .is_ok(),
            Conn::V5(c, _) => c
                .try_subscribe_many(topics.iter().map(|t| m5::Filter::new(t.clone(), v5::mqttbytes::QoS::AtMostOnce)))
                .is_ok(),
        }
    }

    pub fn disconnect(&self) {
        match self {
            Conn::V311(c, _) => drop(c.try_disconnect()),
            Conn::V5(c, _) => drop(c.try_disconnect()),
        }
    }

    pub fn recv(&mut self, timeout: Duration) -> Ev {
        match self {
            Conn::V311(_, conn) => match conn.recv_timeout(timeout) {
                Ok(Ok(rumqttc::Event::Incoming(p))) => match p {
                    rumqttc::Packet::ConnAck(_) => Ev::ConnAck,
                    rumqttc::Packet::PubAck(a) => Ev::PubAck { pkid: a.pkid, refused: None },
                    rumqttc::Packet::Publish(p) => Ev::Publish { topic: p.topic, payload: p.payload.to_vec() },
                    _ => Ev::Other,
                },
                Ok(Ok(rumqttc::Event::Outgoing(Outgoing::Publish(pkid)))) => Ev::OutgoingPublish(pkid),
                Ok(Ok(_)) => Ev::Other,
                Ok(Err(e)) => Ev::Error {
                    reason: edge_wire::tls::connection_failure(&e),
                    tls: edge_wire::tls::handshake_failure(&e),
                    message: e.to_string(),
                },
                Err(rumqttc::RecvTimeoutError::Timeout) => Ev::Timeout,
                Err(rumqttc::RecvTimeoutError::Disconnected) => Ev::Closed,
            },
            Conn::V5(_, conn) => match conn.recv_timeout(timeout) {
                Ok(Ok(v5::Event::Incoming(p))) => match p {
                    m5::Packet::ConnAck(_) => Ev::ConnAck,
                    m5::Packet::PubAck(a) => {
                        let refused = match a.reason {
                            m5::PubAckReason::Success | m5::PubAckReason::NoMatchingSubscribers => None,
                            other => Some(format!("{other:?}")),
                        };
                        Ev::PubAck { pkid: a.pkid, refused }
                    }
                    m5::Packet::Publish(p) => Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    },
                    _ => Ev::Other,
                },
                Ok(Ok(v5::Event::Outgoing(Outgoing::Publish(pkid)))) => Ev::OutgoingPublish(pkid),
                Ok(Ok(_)) => Ev::Other,
                Ok(Err(e)) => Ev::Error {
                    reason: edge_wire::tls::connection_failure(&e),
                    tls: edge_wire::tls::handshake_failure(&e),
                    message: e.to_string(),
                },
                Err(v5::RecvTimeoutError::Timeout) => Ev::Timeout,
                Err(v5::RecvTimeoutError::Disconnected) => Ev::Closed,
            },
        }
    }
}
