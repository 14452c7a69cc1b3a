//! Deriving a message's dedup key (`message_id`, `header:NAME`, `body`, `json:/pointer`) and
//! turning it into the store key `{prefix}:{route}:{id}`, hashing long or non-UTF-8 ids so a
//! remembered key costs a bounded number of bytes.

use lapin::BasicProperties;

use crate::config::KeySpec;

/// Why no key could be derived; the route's `on_missing_key` decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingKey {
    /// The property or header is absent (or empty).
    #[error("absent")]
    Absent,
    /// The body is not JSON, or the pointer does not resolve to a value.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Raw key bytes for `spec`, before namespacing. Header values of every AMQP field type are
/// encoded canonically (same value, same bytes).
pub fn derive(spec: &KeySpec, properties: &BasicProperties, body: &[u8]) -> Result<Vec<u8>, MissingKey> {
    let _ = (spec, properties, body);
    todo!()
}

/// The body-hash key (used by `key = "body"` and `on_missing_key = "hash_body"`).
pub fn body_hash(body: &[u8]) -> Vec<u8> {
    let _ = body;
    todo!()
}

/// `{prefix}:{route}:{id}`; an id over 64 bytes or not valid UTF-8 becomes a fixed-length hash.
pub fn store_key(prefix: &str, route: &str, id: &[u8]) -> String {
    let _ = (prefix, route, id);
    todo!()
}
