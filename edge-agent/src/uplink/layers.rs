//! Which retained message of a kind (a model, a probe program pack) goes
//! to its stage (docs/model.md, "Updates"): a device's come on its own
//! topic (`<prefix>/<device>/<kind>`) and on its groups'
//! (`<prefix>/group/<g>/<kind>`, the groups of `remote_config.groups`).
//! The device's own wins while it holds one; else the last group in the
//! list that holds one (as configuration layers apply). An empty retained
//! message clears a layer. At a connection every retained message comes at
//! once, in no set order: the choice is made only once no message of the
//! kind came for [`SETTLE`], so a box never installs its group's on the
//! way to its own.

use std::time::{Duration, Instant};

/// How long messages must have stopped coming before one is chosen.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The layer of the device's own topic.
pub const DEVICE: &str = "device";

pub struct Layers {
    /// Layers by precedence, lowest first: the groups in their order, then
    /// the device.
    order: Vec<String>,
    held: Vec<Option<Vec<u8>>>,
    changed_at: Option<Instant>,
    /// The message last handed over (a retained one comes again with every
    /// connection: handed over again, the detect stage ignores a model it
    /// runs).
    handed: Option<Vec<u8>>,
}

impl Layers {
    pub fn new(groups: &[String]) -> Layers {
        let order: Vec<String> = groups.iter().map(|g| group_layer(g)).chain([DEVICE.to_owned()]).collect();
        Layers { held: vec![None; order.len()], order, changed_at: None, handed: None }
    }

    /// A message on a layer's topic (empty: the layer is cleared).
    pub fn set(&mut self, layer: &str, payload: Vec<u8>, now: Instant) {
        if let Some(i) = self.order.iter().position(|l| l == layer) {
            self.held[i] = (!payload.is_empty()).then_some(payload);
            self.changed_at = Some(now);
        }
    }

    /// A connection starts: its retained messages are the whole state (a
    /// layer cleared meanwhile sends nothing), so what it brings is chosen
    /// anew.
    pub fn connected(&mut self) {
        self.held.iter_mut().for_each(|h| *h = None);
        self.changed_at = None;
        self.handed = None;
    }

    /// Once the messages settled: the message to hand over, if it is not
    /// the one handed last; with its layer.
    pub fn due(&mut self, now: Instant) -> Option<(String, Vec<u8>)> {
        let at = self.changed_at?;
        if now.saturating_duration_since(at) < SETTLE {
            return None;
        }
        self.changed_at = None;
        let (i, chosen) = self.held.iter().enumerate().rev().find_map(|(i, p)| Some((i, p.as_ref()?)))?;
        if self.handed.as_ref() == Some(chosen) {
            return None;
        }
        self.handed = Some(chosen.clone());
        Some((self.order[i].clone(), chosen.clone()))
    }
}

/// A group's layer name.
pub fn group_layer(group: &str) -> String {
    format!("group-{group}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_devices_own_model_wins_and_nothing_is_chosen_before_the_messages_settle() {
        let t0 = Instant::now();
        let mut l = Layers::new(&["line-1".into(), "site".into()]);
        // A connection's retained messages: the group's first.
        l.set("group-line-1", b"A".to_vec(), t0);
        assert_eq!(l.due(t0 + Duration::from_millis(10)), None, "not settled");
        l.set(DEVICE, b"B".to_vec(), t0 + Duration::from_millis(20));
        assert_eq!(l.due(t0 + Duration::from_millis(1010)), None, "1 s after the last message only");
        assert_eq!(l.due(t0 + Duration::from_millis(1020)), Some(("device".into(), b"B".to_vec())));
        assert_eq!(l.due(t0 + Duration::from_secs(5)), None, "handed once");
        // The device's cleared: the group's.
        let t1 = t0 + Duration::from_secs(10);
        l.set(DEVICE, Vec::new(), t1);
        assert_eq!(l.due(t1 + SETTLE), Some(("group-line-1".into(), b"A".to_vec())));
        // A later group in the list wins over an earlier one.
        l.set("group-site", b"C".to_vec(), t1 + SETTLE);
        assert_eq!(l.due(t1 + 2 * SETTLE), Some(("group-site".into(), b"C".to_vec())));
        // Another layer's topic is not ours.
        l.set("group-other", b"D".to_vec(), t1 + 3 * SETTLE);
        assert_eq!(l.due(t1 + 5 * SETTLE), None);
        // A new connection hands its choice over again (the detect stage
        // ignores the model it runs); a layer cleared while away sends
        // nothing, and holds nothing.
        l.set(DEVICE, b"B".to_vec(), t1 + 5 * SETTLE);
        l.connected();
        l.set("group-site", b"C".to_vec(), t1 + 6 * SETTLE);
        assert_eq!(l.due(t1 + 7 * SETTLE), Some(("group-site".into(), b"C".to_vec())));
        // Everything cleared: nothing to hand over.
        for layer in ["group-line-1", "group-site"] {
            l.set(layer, Vec::new(), t1 + 8 * SETTLE);
        }
        assert_eq!(l.due(t1 + 9 * SETTLE), None);
    }
}
