//! The checker over a recorded history: every acknowledged message delivered to its recipient exactly
//! once, in per-conversation order, under the id its acknowledgement gave; and, over the replicas'
//! databases afterwards, stored exactly once and identically everywhere.

use std::collections::HashMap;

use serde::Serialize;

use crate::client::Record;

/// What the history says.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Verdict {
    pub acked: u64,
    /// Acknowledged, never delivered.
    pub lost: u64,
    /// Deliveries beyond the first of the same message.
    pub duplicated: u64,
    /// Deliveries that came after a later message of the same conversation.
    pub out_of_order: u64,
    /// Delivered, but under another id than the acknowledgement gave, or never acknowledged.
    pub mismatched: u64,
    /// Users that gave up (could not reach a primary, or got an error).
    pub failed_users: Vec<String>,
    /// The first few problems, spelled out.
    pub examples: Vec<String>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.mismatched == 0
            && self.failed_users.is_empty()
    }

    fn note(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }
}

/// Check the users' records against each other.
pub fn history(records: &[Record]) -> Verdict {
    let mut v = Verdict::default();
    // (sender, seq) -> acknowledged id.
    let mut acked: HashMap<(usize, u64), u64> = HashMap::new();
    for r in records {
        if let Some(f) = &r.failure {
            v.failed_users.push(f.clone());
        }
        for a in &r.acks {
            acked.insert((r.index, a.seq), a.id);
        }
    }
    v.acked = acked.len() as u64;
    let mut delivered: HashMap<(usize, u64), u32> = HashMap::new();
    for r in records {
        // Per sender: the last (seq, id) delivered, to check conversation order.
        let mut last: HashMap<usize, (u64, u64)> = HashMap::new();
        for d in &r.deliveries {
            let count = delivered.entry((d.from, d.seq)).or_default();
            *count += 1;
            if *count > 1 {
                v.duplicated += 1;
                v.note(format!("{} got message {}#{} (id {}) again", r.name, d.from, d.seq, d.id));
                continue;
            }
            match acked.get(&(d.from, d.seq)) {
                Some(&id) if id == d.id => {}
                Some(&id) => {
                    v.mismatched += 1;
                    v.note(format!("{} got {}#{} as id {}, acknowledged as {id}", r.name, d.from, d.seq, d.id));
                }
                None => {
                    v.mismatched += 1;
                    v.note(format!("{} got {}#{} (id {}), never acknowledged", r.name, d.from, d.seq, d.id));
                }
            }
            if let Some(&(seq, id)) = last.get(&d.from) {
                if d.seq <= seq || d.id <= id {
                    v.out_of_order += 1;
                    v.note(format!("{} got {}#{} (id {}) after #{seq} (id {id})", r.name, d.from, d.seq, d.id));
                }
            }
            last.insert(d.from, (d.seq, d.id));
        }
    }
    for (&(from, seq), &id) in &acked {
        if !delivered.contains_key(&(from, seq)) {
            v.lost += 1;
            v.note(format!("message {from}#{seq} (id {id}) acknowledged, never delivered"));
        }
    }
    v
}

/// What the replicas' databases say, after the run.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Stored {
    pub replicas: usize,
    /// Every replica's state (users, messages, events) is byte-for-byte the same.
    pub identical: bool,
    pub messages_stored: u64,
    /// Acknowledged but not stored (on the first replica).
    pub missing: u64,
    /// (sender, client id) stored more than once, or an acknowledged one stored under another id.
    pub duplicated_or_moved: u64,
    pub examples: Vec<String>,
}

/// Compare the replicas' dumps ([`replichat::storage::Db::dump_state`]) and find every acknowledged send in
/// them, exactly once, under its id.
pub fn stored(dumps: &[(u64, String)], records: &[Record]) -> Stored {
    let mut s = Stored { replicas: dumps.len(), identical: true, ..Stored::default() };
    let Some((first_id, first)) = dumps.first() else { return s };
    for (id, dump) in &dumps[1..] {
        if dump != first {
            s.identical = false;
            let diff = first.lines().zip(dump.lines()).position(|(a, b)| a != b);
            s.examples.push(format!("replica {id} differs from replica {first_id} at line {diff:?}"));
        }
    }
    // messages: id, sender_id, recipient_id, client_id, body, sent_at, delivered_at, read_at
    let rows = replichat::storage::dump_section(first, "messages");
    s.messages_stored = rows.len() as u64;
    let mut by_client_id: HashMap<&str, Vec<u64>> = HashMap::new();
    for row in &rows {
        if let (Some(id), Some(client_id)) = (row.first().and_then(|v| v.parse().ok()), row.get(3)) {
            by_client_id.entry(client_id).or_default().push(id);
        }
    }
    for r in records {
        for a in &r.acks {
            match by_client_id.get(a.client_id.as_str()).map(Vec::as_slice) {
                None | Some([]) => {
                    s.missing += 1;
                    if s.examples.len() < 10 {
                        s.examples.push(format!("{} acknowledged as id {}, not stored", a.client_id, a.id));
                    }
                }
                Some([id]) if *id == a.id => {}
                Some(ids) => {
                    s.duplicated_or_moved += 1;
                    if s.examples.len() < 10 {
                        s.examples.push(format!("{} acknowledged as id {}, stored as {ids:?}", a.client_id, a.id));
                    }
                }
            }
        }
    }
    s
}

impl Stored {
    pub fn is_clean(&self) -> bool {
        self.identical && self.missing == 0 && self.duplicated_or_moved == 0
    }
}
