//! Taking the devices' messages from a NATS cluster's JetStream
//! (`[jetstream]`, docs/scaling.md): the devices publish over MQTT to the
//! cluster's MQTT listeners; a work-queue stream holds their messages; every
//! bridge pulls from one durable consumer and acknowledges a message once
//! the pipeline is done with it (written, or refused for good), exactly
//! when it would have sent the MQTT PUBACK. Time requests come on a queue
//! subscription (one bridge answers); confirmations, time answers and dead
//! letters go out as plain NATS messages, which the cluster hands to the
//! device's MQTT subscription at QoS 0, as the MQTT path sends them.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;

use crate::config::Config;
use crate::metrics::{self, BridgeMetrics};
use crate::{Credits, Event, Incoming, Link};
use edge_wire::throttle::Throttle;

/// The NATS subject of an MQTT topic, as the NATS server converts it: `/`
/// separates levels (`.` in NATS), and a `.` inside a level becomes `//`
/// (nats-server 2.10 and later; 2.9 refuses such topics).
pub fn subject_of(topic: &str) -> String {
    topic.split('/').map(|level| level.replace('.', "//")).collect::<Vec<_>>().join(".")
}

/// The MQTT topic of a NATS subject: the inverse of [`subject_of`].
pub fn topic_of(subject: &str) -> String {
    subject.split('.').map(|token| token.replace("//", ".")).collect::<Vec<_>>().join("/")
}

/// Messages a pull asks for at once. Each may be a 4 MiB block, and the
/// client holds a pull's messages before the pipeline takes them (the
/// byte budget bounds only what it took): 32 keep that under 128 MiB.
const PULL_BATCH: usize = 32;

/// Connects, makes sure the stream and the consumer exist, and feeds the
/// pipeline until the process ends. Runs on the calling thread.
pub(crate) fn run(
    cfg: &Config,
    metrics: BridgeMetrics,
    credits: Arc<Credits>,
    tx: std::sync::mpsc::Sender<Event>,
    link_out: impl FnOnce(Link),
) -> Result<(), crate::RunError> {
    let js_cfg = &cfg.jetstream;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nats")
        .enable_all()
        .build()
        .map_err(crate::RunError::Start)?;
    let events = metrics.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.mqtt.client_id)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let m = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        m.mqtt_connected.set(1);
                        tracing::info!("connected to the NATS cluster");
                    }
                    async_nats::Event::Disconnected => {
                        m.mqtt_connected.set(0);
                        m.connection_failures
                            .get_or_create(&metrics::ReasonLabels { reason: "disconnected".into() })
                            .inc();
                        tracing::warn!("disconnected from the NATS cluster; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
    if js_cfg.tls.enabled {
        let tls = js_cfg.tls.client_config()?;
        opts = opts.tls_client_config((*tls).clone()).require_tls(true);
    }
    let servers: Vec<async_nats::ServerAddr> = js_cfg
        .servers
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e| crate::RunError::Start(std::io::Error::other(format!("jetstream.servers: {s:?}: {e}"))))
        })
        .collect::<Result<_, _>>()?;
    let client = rt
        .block_on(opts.connect(servers))
        .map_err(|e| crate::RunError::Start(std::io::Error::other(format!("NATS: {e}"))))?;
    let link = Link::Nats { client: client.clone(), rt: rt.handle().clone() };
    link_out(link.clone());

    // Time requests: one bridge of the queue group answers each.
    let prefix = cfg.mqtt.topic_prefix.clone();
    let time_subject = format!("{}.*.time", subject_of(&prefix));
    let (time_client, time_metrics, queue) = (client.clone(), metrics.clone(), js_cfg.consumer.clone());
    let time_link = link.clone();
    rt.spawn(async move {
        loop {
            match time_client.queue_subscribe(time_subject.clone(), queue.clone()).await {
                Ok(mut sub) => {
                    while let Some(m) = sub.next().await {
                        crate::answer_time(
                            &time_link,
                            &prefix,
                            &topic_of(m.subject.as_str()),
                            &m.payload,
                            &time_metrics,
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to time requests; trying again"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    let credit_wait = Duration::from_secs(10);
    rt.block_on(async move {
        // Inside the runtime: the context starts a task of its own.
        let js = jetstream::new(client);
        let mut said = Throttle::new(Duration::from_secs(60));
        loop {
            let consumer = match consumer(&js, cfg).await {
                Ok(c) => c,
                Err(e) => {
                    metrics.subscribed.set(0);
                    if let Some(suppressed) = said.due() {
                        tracing::warn!(
                            error = %e,
                            stream = js_cfg.stream,
                            consumer = js_cfg.consumer,
                            suppressed,
                            "cannot set up the JetStream stream and consumer; trying again (said at most once a minute)"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull from the consumer; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            metrics.subscribed.set(1);
            said.reset();
            tracing::info!(stream = js_cfg.stream, consumer = js_cfg.consumer, "pulling the devices' messages");
            while let Some(m) = messages.next().await {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // A missed heartbeat, a lost node, a consumer
                        // moved: pull anew. What was taken stays taken
                        // (acknowledged when done, or handed out again
                        // after ack_wait).
                        tracing::warn!(error = %e, "pulling from the consumer failed; pulling anew");
                        break;
                    }
                };
                let (m, acker) = m.split();
                take_credits(&credits, m.payload.len(), credit_wait).await;
                let incoming = Incoming {
                    topic: topic_of(m.subject.as_str()),
                    payload: m.payload,
                    ack: crate::Ack::JetStream(Box::new(acker)),
                };
                if tx.send(Event::Publish(incoming)).is_err() {
                    return; // pipeline gone
                }
            }
            metrics.subscribed.set(0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(())
}

/// The stream of the devices' messages and the bridges' consumer, made if
/// missing (an existing stream is used as it is).
async fn consumer(
    js: &jetstream::Context,
    cfg: &Config,
) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>, String> {
    let c = &cfg.jetstream;
    let p = subject_of(&cfg.mqtt.topic_prefix);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: c.stream.clone(),
            subjects: vec![format!("{p}.*.metrics"), format!("{p}.*.presence")],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            num_replicas: c.replicas,
            max_bytes: if c.max_bytes == 0 { -1 } else { c.max_bytes.min(i64::MAX as u64) as i64 },
            // Full: new messages are refused (the device sends again), never
            // the oldest dropped.
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", c.stream))?;
    stream
        .get_or_create_consumer(
            &c.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(c.consumer.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(c.ack_wait_secs),
                max_ack_pending: c.max_ack_pending,
                // Never given up on: a message leaves only when acknowledged.
                max_deliver: -1,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {}: {e}", c.consumer))
}

/// [`Credits::take`] without blocking the runtime: waits for room up to
/// `wait`, then takes them anyway.
async fn take_credits(credits: &Credits, n: usize, wait: Duration) {
    let until = std::time::Instant::now() + wait;
    while !credits.try_take(n) {
        if std::time::Instant::now() >= until {
            credits.take(n, Duration::ZERO);
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_subjects_convert_as_the_nats_server_does() {
        for (topic, subject) in [
            ("edge/pump-7/metrics", "edge.pump-7.metrics"),
            ("edge/line.1/ack", "edge.line//1.ack"),
            ("edge/pump_7/time/reply", "edge.pump_7.time.reply"),
            ("fleet/deadletter/too_large", "fleet.deadletter.too_large"),
        ] {
            assert_eq!(subject_of(topic), subject);
            assert_eq!(topic_of(subject), topic);
        }
    }
}
