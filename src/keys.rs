//! Deriving a message's dedup key (`message_id`, `header:NAME`, `body`, `json:/pointer`) and
//! turning it into the store key `{prefix}:{route}:{id}`, hashing long or non-UTF-8 ids so a
//! remembered key costs a bounded number of bytes.
//!
//! Two properties matter and are tested here: the same logical value always yields the same
//! key (or a redelivered copy would not be recognised), and different values never yield the
//! same key (or a distinct message would be dropped as a duplicate). That is why header values
//! of non-string AMQP types get a tagged, self-delimiting encoding instead of some lossy
//! rendering like `to_string()`, and so do non-string JSON values: `{"id":1}` and `{"id":"1"}`
//! are different messages.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::config::KeySpec;

/// Why no key could be derived; the route's `on_missing_key` decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MissingKey {
    /// The property, header or JSON value is absent, empty, void or null, or the JSON
    /// pointer does not resolve.
    #[error("absent")]
    Absent,
    /// The body is not JSON.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Longest id kept literally in a store key; longer ones are hashed.
const MAX_LITERAL_ID: usize = 64;

/// Bytes of blake3 kept when an id is hashed: 128 bits, collision-free for any realistic
/// number of keys, and 32 hex characters in the key.
const HASHED_ID_BYTES: usize = 16;

/// First byte of every non-string header or JSON encoding. 0xFF never occurs in UTF-8, so an
/// encoded number can never equal a textual header or JSON value.
const TAGGED: u8 = 0xFF;

/// Raw key bytes for `spec`, before namespacing. Header values of every AMQP field type are
/// encoded canonically (same value, same bytes).
pub fn derive(
    spec: &KeySpec,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Vec<u8>, MissingKey> {
    match spec {
        KeySpec::MessageId => match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => Ok(id.as_str().as_bytes().to_vec()),
            _ => Err(MissingKey::Absent),
        },
        KeySpec::Header(name) => properties
            .headers()
            .as_ref()
            .and_then(|headers| header_key(headers, name))
            .ok_or(MissingKey::Absent),
        KeySpec::Body => Ok(body_hash(body)),
        KeySpec::Json(pointer) => json_key(pointer, body),
    }
}

/// The body-hash key (used by `key = "body"` and `on_missing_key = "hash_body"`).
pub fn body_hash(body: &[u8]) -> Vec<u8> {
    blake3::hash(body).as_bytes().to_vec()
}

/// Whether `id` is spelled like a hashed id in a store key (`#` + 32 lowercase hex digits), the
/// form `dedupd inspect` and `forget` accept verbatim for ids nobody can type.
pub fn is_hashed_id(id: &str) -> bool {
    id.strip_prefix('#').is_some_and(|hex| {
        hex.len() == 2 * HASHED_ID_BYTES
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// `{prefix}:{route}:{id}`; an id over 64 bytes or not valid UTF-8 becomes a fixed-length hash.
///
/// A hashed id is written `#` + 32 hex digits. A literal id that itself starts with `#` is
/// hashed too, so no literal id can ever spell the hash of another one.
pub fn store_key(prefix: &str, route: &str, id: &[u8]) -> String {
    match std::str::from_utf8(id) {
        Ok(text) if text.len() <= MAX_LITERAL_ID && !text.starts_with('#') => {
            format!("{prefix}:{route}:{text}")
        }
        _ => {
            let hash = blake3::hash(id);
            let mut key =
                String::with_capacity(prefix.len() + route.len() + 3 + 2 * HASHED_ID_BYTES);
            key.push_str(prefix);
            key.push(':');
            key.push_str(route);
            key.push_str(":#");
            push_hex(&mut key, &hash.as_bytes()[..HASHED_ID_BYTES]);
            key
        }
    }
}

/// The id part of a key [`store_key`] built for `prefix` and `route`: the id itself, or `#`
/// and the hex of its hash. What `stamp_header` carries and `dedupd inspect` accepts.
pub fn stored_id<'k>(prefix: &str, route: &str, store_key: &'k str) -> &'k str {
    store_key
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.strip_prefix(route))
        .and_then(|rest| rest.strip_prefix(':'))
        .unwrap_or(store_key)
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// The key bytes of header `name`, `None` when there is no usable value.
///
/// Strings (short or long: the wire type a producer picked is incidental) are used as-is, so
/// an operator can type them into `dedupd inspect`. An empty string or a void value is no id
/// at all: keying on it would collapse every such message into one, so it counts as absent.
/// Everything else is `0xFF` followed by the tagged encoding of [`encode_value`]. A string that
/// is not UTF-8 and happens to start with `0xFF` is tagged as well, which keeps the mapping
/// injective over all values.
fn header_key(headers: &FieldTable, name: &str) -> Option<Vec<u8>> {
    header_value_key(headers.inner().get(name)?)
}

/// The key bytes of one header value, as [`derive`] computes them for `header:NAME` (`None`
/// for an empty string or void): for `dedupd inspect` given a typed value.
pub fn header_value_key(value: &AMQPValue) -> Option<Vec<u8>> {
    let raw = match value {
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::Void => return None,
        _ => None,
    };
    match raw {
        Some([]) => None,
        Some(bytes) if bytes[0] != TAGGED => Some(bytes.to_vec()),
        _ => {
            let mut out = vec![TAGGED];
            encode_value(value, &mut out);
            Some(out)
        }
    }
}

/// Appends a self-delimiting encoding of `value`: one tag byte (the AMQP field type letter),
/// then fixed-width big-endian numbers or length-prefixed contents. Self-delimiting means a
/// sequence of encodings (array items, table entries) decodes unambiguously, so distinct
/// nested values cannot collide either.
fn encode_value(value: &AMQPValue, out: &mut Vec<u8>) {
    match value {
        AMQPValue::Boolean(v) => {
            out.push(b't');
            out.push(u8::from(*v));
        }
        AMQPValue::ShortShortInt(v) => {
            out.push(b'b');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::ShortShortUInt(v) => {
            out.push(b'B');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::ShortInt(v) => {
            out.push(b's');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::ShortUInt(v) => {
            out.push(b'u');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::LongInt(v) => {
            out.push(b'I');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::LongUInt(v) => {
            out.push(b'i');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::LongLongInt(v) => {
            out.push(b'l');
            out.extend_from_slice(&v.to_be_bytes());
        }
        // Floats by their bits: the wire value, exactly (no rounding through text).
        AMQPValue::Float(v) => {
            out.push(b'f');
            out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
        AMQPValue::Double(v) => {
            out.push(b'd');
            out.extend_from_slice(&v.to_bits().to_be_bytes());
        }
        AMQPValue::DecimalValue(v) => {
            out.push(b'D');
            out.push(v.scale);
            out.extend_from_slice(&v.value.to_be_bytes());
        }
        // Both string types share one tag, as at the top level.
        AMQPValue::ShortString(v) => push_bytes(b'S', v.as_str().as_bytes(), out),
        AMQPValue::LongString(v) => push_bytes(b'S', v.as_bytes(), out),
        AMQPValue::ByteArray(v) => push_bytes(b'x', v.as_slice(), out),
        AMQPValue::Timestamp(v) => {
            out.push(b'T');
            out.extend_from_slice(&v.to_be_bytes());
        }
        AMQPValue::FieldArray(items) => {
            out.push(b'A');
            push_len(items.as_slice().len(), out);
            for item in items.as_slice() {
                encode_value(item, out);
            }
        }
        // Tables are BTreeMaps, so iteration is in key order whatever order the wire had.
        AMQPValue::FieldTable(table) => {
            out.push(b'F');
            push_len(table.inner().len(), out);
            for (key, item) in table {
                push_len(key.as_str().len(), out);
                out.extend_from_slice(key.as_str().as_bytes());
                encode_value(item, out);
            }
        }
        AMQPValue::Void => out.push(b'V'),
    }
}

fn push_bytes(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    push_len(bytes.len(), out);
    out.extend_from_slice(bytes);
}

fn push_len(len: usize, out: &mut Vec<u8>) {
    // u64 so that no length can be truncated: lengths must never alias.
    out.extend_from_slice(&(len as u64).to_be_bytes());
}

/// The key of the value at `pointer` in a JSON body (see [`json_value_key`]); unresolved is
/// absent.
fn json_key(pointer: &str, body: &[u8]) -> Result<Vec<u8>, MissingKey> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| MissingKey::Malformed(e.to_string()))?;
    json_value_key(doc.pointer(pointer).ok_or(MissingKey::Absent)?)
}

/// The key bytes of one JSON value, as [`derive`] computes them for `json:/pointer`: a string
/// as its bytes (so an operator can type it into `dedupd inspect`), any other value as `0xFF`,
/// a type letter (`n` number, `b` boolean, `a` array, `o` object) and its canonical JSON text
/// (object keys sorted). The tag keeps `1` and `"1"` apart, as for headers. Null and the empty
/// string are absent.
pub fn json_value_key(value: &serde_json::Value) -> Result<Vec<u8>, MissingKey> {
    let letter = match value {
        serde_json::Value::Null => return Err(MissingKey::Absent),
        serde_json::Value::String(s) if s.is_empty() => return Err(MissingKey::Absent),
        serde_json::Value::String(s) => return Ok(s.as_bytes().to_vec()),
        serde_json::Value::Number(_) => b'n',
        serde_json::Value::Bool(_) => b'b',
        serde_json::Value::Array(_) => b'a',
        serde_json::Value::Object(_) => b'o',
    };
    let mut text = String::new();
    canonical_json(value, &mut text);
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&[TAGGED, letter]);
    out.extend_from_slice(text.as_bytes());
    Ok(out)
}

/// Compact JSON with object keys sorted. serde_json already sorts unless some crate in the
/// build turns on its `preserve_order` feature; sorting here keeps keys stable either way, so
/// `{"a":1,"b":2}` and `{"b":2,"a":1}` are the same id.
fn canonical_json(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(item, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use lapin::types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };
    use lapin::BasicProperties;

    use super::*;

    fn with_header(value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("k"), value);
        BasicProperties::default().with_headers(headers)
    }

    fn header(value: AMQPValue) -> Result<Vec<u8>, MissingKey> {
        derive(
            &KeySpec::Header("k".into()),
            &with_header(value),
            b"ignored",
        )
    }

    fn json(pointer: &str, body: &str) -> Result<Vec<u8>, MissingKey> {
        derive(
            &KeySpec::Json(pointer.into()),
            &BasicProperties::default(),
            body.as_bytes(),
        )
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    /// One value of every AMQP field type, plus near-misses that must stay distinct.
    fn every_type() -> Vec<AMQPValue> {
        vec![
            AMQPValue::Boolean(true),
            AMQPValue::Boolean(false),
            AMQPValue::ShortShortInt(1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(1),
            AMQPValue::ShortUInt(1),
            AMQPValue::LongInt(1),
            AMQPValue::LongUInt(1),
            AMQPValue::LongLongInt(1),
            AMQPValue::LongLongInt(-1),
            AMQPValue::Float(1.0),
            AMQPValue::Double(1.0),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 100,
            }),
            AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 1 }),
            AMQPValue::LongString(LongString::from("1")),
            AMQPValue::ByteArray(ByteArray::from(vec![1u8])),
            AMQPValue::ByteArray(ByteArray::from(b"1".to_vec())),
            AMQPValue::Timestamp(1),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString(LongString::from("a")),
                AMQPValue::LongString(LongString::from("b")),
            ])),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from("ab"),
            )])),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void])),
            AMQPValue::FieldArray(FieldArray::default()),
            AMQPValue::FieldTable(table(&[("a", AMQPValue::LongInt(1))])),
            AMQPValue::FieldTable(table(&[("a", AMQPValue::LongUInt(1))])),
            AMQPValue::FieldTable(FieldTable::default()),
        ]
    }

    #[test]
    fn message_id_is_used_as_is() {
        let props = BasicProperties::default().with_message_id(ShortString::from("order-42"));
        assert_eq!(
            derive(&KeySpec::MessageId, &props, b"body"),
            Ok(b"order-42".to_vec())
        );
    }

    #[test]
    fn message_id_absent_or_empty() {
        let none = BasicProperties::default();
        assert_eq!(
            derive(&KeySpec::MessageId, &none, b"x"),
            Err(MissingKey::Absent)
        );
        let empty = BasicProperties::default().with_message_id(ShortString::from(""));
        assert_eq!(
            derive(&KeySpec::MessageId, &empty, b"x"),
            Err(MissingKey::Absent)
        );
    }

    #[test]
    fn string_headers_are_used_as_is() {
        assert_eq!(
            header(AMQPValue::LongString(LongString::from("abc"))),
            Ok(b"abc".to_vec())
        );
        assert_eq!(
            header(AMQPValue::ShortString(ShortString::from("abc"))),
            Ok(b"abc".to_vec())
        );
    }

    #[test]
    fn header_absent_empty_or_void() {
        let no_headers = BasicProperties::default();
        let spec = KeySpec::Header("k".into());
        assert_eq!(derive(&spec, &no_headers, b""), Err(MissingKey::Absent));
        let other = with_header(AMQPValue::LongInt(1));
        assert_eq!(
            derive(&KeySpec::Header("other".into()), &other, b""),
            Err(MissingKey::Absent)
        );
        assert_eq!(
            header(AMQPValue::LongString(LongString::from(""))),
            Err(MissingKey::Absent)
        );
        assert_eq!(header(AMQPValue::Void), Err(MissingKey::Absent));
    }

    #[test]
    fn every_header_type_gives_a_distinct_key() {
        let values = every_type();
        let keys: Vec<Vec<u8>> = values
            .iter()
            .map(|v| header(v.clone()).expect("every type yields a key"))
            .collect();
        let distinct: HashSet<&Vec<u8>> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "collision among {values:?}");
        // Non-string encodings are not UTF-8, so they always take the hashed store key path
        // and cannot spell a literal id.
        for (v, k) in values.iter().zip(&keys) {
            if !matches!(v, AMQPValue::LongString(_)) {
                assert!(std::str::from_utf8(k).is_err(), "{v:?}");
            }
        }
    }

    #[test]
    fn string_one_and_short_int_one_differ() {
        let text = header(AMQPValue::LongString(LongString::from("1"))).unwrap();
        let number = header(AMQPValue::ShortInt(1)).unwrap();
        assert_ne!(text, number);
        assert_ne!(
            store_key("p", "r", &text),
            store_key("p", "r", &number),
            "store keys must differ too"
        );
    }

    #[test]
    fn binary_string_starting_with_ff_cannot_spell_a_tagged_value() {
        let number = header(AMQPValue::LongInt(7)).unwrap();
        assert_eq!(number[0], TAGGED);
        // A long string whose raw bytes equal the tagged encoding of a number.
        let forged = header(AMQPValue::LongString(LongString::from(number.clone()))).unwrap();
        assert_ne!(forged, number);
        // It is still deterministic.
        assert_eq!(
            header(AMQPValue::LongString(LongString::from(number.clone()))).unwrap(),
            forged
        );
    }

    #[test]
    fn header_encoding_is_deterministic() {
        for v in every_type() {
            assert_eq!(header(v.clone()), header(v));
        }
        // Table key order on the wire does not matter: tables are sorted maps.
        let ab = table(&[("a", AMQPValue::LongInt(1)), ("b", AMQPValue::LongInt(2))]);
        let ba = table(&[("b", AMQPValue::LongInt(2)), ("a", AMQPValue::LongInt(1))]);
        assert_eq!(
            header(AMQPValue::FieldTable(ab)),
            header(AMQPValue::FieldTable(ba))
        );
    }

    #[test]
    fn float_keys_are_exact_bits() {
        assert_ne!(
            header(AMQPValue::Double(0.1)),
            header(AMQPValue::Double(0.1 + f64::EPSILON))
        );
        assert_ne!(
            header(AMQPValue::Float(1.0)),
            header(AMQPValue::Double(1.0))
        );
    }

    #[test]
    fn body_key_is_the_blake3_hash() {
        let key = derive(&KeySpec::Body, &BasicProperties::default(), b"hello").unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(key, blake3::hash(b"hello").as_bytes().to_vec());
        assert_eq!(key, body_hash(b"hello"));
        assert_ne!(body_hash(b"hello"), body_hash(b"hello!"));
    }

    #[test]
    fn json_string_number_bool_object_array() {
        let body = r#"{"id":"abc","n":12.5,"ok":true,"o":{"b":2,"a":[1,"x"]},"arr":[3,2]}"#;
        let tagged = |letter: u8, text: &[u8]| [&[TAGGED, letter][..], text].concat();
        assert_eq!(json("/id", body), Ok(b"abc".to_vec()));
        assert_eq!(json("/n", body), Ok(tagged(b'n', b"12.5")));
        assert_eq!(json("/ok", body), Ok(tagged(b'b', b"true")));
        assert_eq!(
            json("/o", body),
            Ok(tagged(b'o', br#"{"a":[1,"x"],"b":2}"#))
        );
        assert_eq!(json("/arr", body), Ok(tagged(b'a', b"[3,2]")));
        assert_eq!(json("/o/a/1", body), Ok(b"x".to_vec()));
    }

    /// A value and its string spelling are different messages, at any depth.
    #[test]
    fn json_values_of_other_types_never_equal_strings() {
        let pairs = [
            (r#"{"a":{"b":1}}"#, r#"{"a":{"b":"1"}}"#, "/a/b"),
            (r#"{"id":true}"#, r#"{"id":"true"}"#, "/id"),
            (r#"{"id":12.5}"#, r#"{"id":"12.5"}"#, "/id"),
            (r#"{"id":[1]}"#, r#"{"id":"[1]"}"#, "/id"),
            (r#"{"id":{"x":1}}"#, r#"{"id":"{\"x\":1}"}"#, "/id"),
        ];
        for (typed, text, pointer) in pairs {
            let (typed_key, text_key) =
                (json(pointer, typed).unwrap(), json(pointer, text).unwrap());
            assert_ne!(typed_key, text_key, "{typed} vs {text}");
            assert_ne!(
                store_key("p", "r", &typed_key),
                store_key("p", "r", &text_key)
            );
        }
        // Strings keep the form an operator types into `dedupd inspect`.
        assert_eq!(json("/a/b", r#"{"a":{"b":"1"}}"#), Ok(b"1".to_vec()));
        assert_eq!(
            store_key("p", "r", &json("/a/b", r#"{"a":{"b":"1"}}"#).unwrap()),
            "p:r:1"
        );
        // Types stay apart from each other too: 1, true, [1], {"1":1}.
        let keys: HashSet<Vec<u8>> = [
            r#"{"k":1}"#,
            r#"{"k":true}"#,
            r#"{"k":[1]}"#,
            r#"{"k":{"1":1}}"#,
        ]
        .iter()
        .map(|body| json("/k", body).unwrap())
        .collect();
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn json_objects_are_canonical() {
        let a = json("/o", r#"{"o":{"x":1,"y":{"q":1,"p":2}}}"#);
        let b = json("/o", r#"{"o": {"y": {"p": 2, "q": 1}, "x": 1}}"#);
        assert_eq!(a, b);
    }

    #[test]
    fn json_missing_null_or_empty_is_absent() {
        let body = r#"{"id":null,"e":""}"#;
        assert_eq!(json("/id", body), Err(MissingKey::Absent));
        assert_eq!(json("/nope", body), Err(MissingKey::Absent));
        assert_eq!(json("/e", body), Err(MissingKey::Absent));
    }

    #[test]
    fn json_malformed_body() {
        assert!(matches!(
            json("/id", "not json"),
            Err(MissingKey::Malformed(_))
        ));
        assert!(matches!(json("/id", ""), Err(MissingKey::Malformed(_))));
    }

    #[test]
    fn stored_id_is_what_store_key_appended() {
        assert_eq!(
            stored_id("dd", "orders", &store_key("dd", "orders", b"a:b")),
            "a:b"
        );
        let long = "x".repeat(100);
        let hashed = store_key("dd", "orders", long.as_bytes());
        let id = stored_id("dd", "orders", &hashed);
        assert!(is_hashed_id(id), "{id}");
        assert_eq!(format!("dd:orders:{id}"), hashed);
        assert!(is_hashed_id(stored_id(
            "dd",
            "r",
            &store_key("dd", "r", &[0xff])
        )));
        // A prefix that ends like a route name is not mistaken for one.
        assert_eq!(stored_id("dd", "r", "dd:rr:1"), "dd:rr:1");
    }

    #[test]
    fn store_key_literal_when_short_utf8() {
        assert_eq!(store_key("dedupd", "orders", b"abc"), "dedupd:orders:abc");
        let sixty_four = "x".repeat(64);
        assert_eq!(
            store_key("p", "r", sixty_four.as_bytes()),
            format!("p:r:{sixty_four}")
        );
    }

    #[test]
    fn store_key_hashes_long_non_utf8_and_hash_like_ids() {
        let long = "é".repeat(127) + "a"; // 255 bytes of UTF-8
        assert_eq!(long.len(), 255);
        let key = store_key("dedupd", "orders", long.as_bytes());
        assert!(key.starts_with("dedupd:orders:#"));
        assert_eq!(key.len(), "dedupd:orders:#".len() + 32);

        let sixty_five = "x".repeat(65);
        assert!(store_key("p", "r", sixty_five.as_bytes()).starts_with("p:r:#"));

        let binary = store_key("p", "r", &[0xff, 0xfe]);
        assert!(binary.starts_with("p:r:#"));

        // A literal '#...' id must not be able to spell another id's hash.
        let hashed = store_key("p", "r", sixty_five.as_bytes());
        let forged_id = hashed.strip_prefix("p:r:").unwrap();
        assert_ne!(store_key("p", "r", forged_id.as_bytes()), hashed);
        assert!(store_key("p", "r", b"#1").starts_with("p:r:#"));
        assert_eq!(store_key("p", "r", b"#1").len(), "p:r:#".len() + 32);
    }

    #[test]
    fn store_key_of_a_255_byte_message_id_is_bounded() {
        let id = "a".repeat(255);
        let props = BasicProperties::default().with_message_id(ShortString::from(id.as_str()));
        let raw = derive(&KeySpec::MessageId, &props, b"").unwrap();
        let key = store_key("dedupd", "orders", &raw);
        assert!(key.len() <= 100, "{} bytes: {key}", key.len());
    }

    #[test]
    fn store_key_of_a_body_hash_is_hashed() {
        let key = store_key("dedupd", "r", &body_hash(b"x"));
        assert!(key.starts_with("dedupd:r:#"));
        assert_eq!(key, store_key("dedupd", "r", &body_hash(b"x")));
    }

    #[test]
    fn store_key_is_deterministic_and_distinguishes_ids() {
        let ids: [&[u8]; 5] = [b"a", b"b", &[0xff; 70], &[0xfe; 70], b"#a"];
        let keys: HashSet<String> = ids.iter().map(|id| store_key("p", "r", id)).collect();
        assert_eq!(keys.len(), ids.len());
        for id in ids {
            assert_eq!(store_key("p", "r", id), store_key("p", "r", id));
        }
    }
}
