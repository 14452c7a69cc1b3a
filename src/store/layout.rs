//! Where a dedup key lives in Redis: the compact layout of remembered keys.
//!
//! A store key (`{prefix}:{route}:{id}`, see `keys::store_key`) is never written to Redis as
//! such. Its 17-byte blake3 digest decides everything:
//!
//! - **group** (2 bytes, modulo [`GROUPS`]): which of the route's six *tables* holds it. Each
//!   table's key names share one hash tag, so one script call can handle every key of a table
//!   even on Redis Cluster, and the six tags are picked to fall in six evenly spaced slot
//!   ranges, so a route's load spreads over the masters of any cluster whose slots are split
//!   into 1, 2, 3 or 6 even ranges (what `redis-cli --cluster create` does) and close to evenly
//!   for other splits.
//! - **field** (the other 15 bytes, 120 bits): the key's name inside the table. A remembered key
//!   is one field of a listpack-encoded hash, whose value is the time the key is forgotten, in
//!   ticks of [`TICK_MS`] since [`EPOCH_MS`] (a decimal integer), or, for a key remembered with
//!   its first copy's body digest, 12 bytes: that tick big-endian in 4, then the 8-byte digest
//!   (see `scripts.rs`; about 8 bytes of `used_memory` more per key, measured in
//!   `tests/sizing.rs`). Its first four bytes also pick the hash (*shard*)
//!   within the table by linear hashing (see `scripts.rs`).
//!
//! Two different ids of one route collide only if 122.6 bits of their digests agree: with
//! `n` keys remembered at once, the chance that any two collide is about `n² / 2^123.6`, i.e.
//! 6·10⁻²⁰ for 864 million keys (10,000 messages/s for a 24 h window).
//!
//! # Names (for one table, `T` = `{prefix}:{{route}/{group}/{n}}`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `T:m` | hash | `n` shards, `c` remembered keys, sweep cursor `s` and pass start `ps` |
//! | `T:{i}` | hash | shard `i`: field → expiry tick (and body digest) |
//! | `T:c:{field in hex}` | string | an in-flight claim: the owner token, with the lease as its TTL |
//! | `{prefix}:{{route}}:legacy-until` | string | when the last key of the 0.1 layout expires |
//!
//! Keys of the 0.1 layout are the store keys themselves (`{prefix}:{route}:{id}` strings); none
//! of the names above can match the pattern `{prefix}:{route}:*`, because a `{` follows the
//! prefix where the route's first character would be.

use std::sync::Arc;

/// Tables per route. Six evenly spaced slot ranges divide evenly among 1, 2, 3 or 6 masters.
/// On Redis Cluster one batch costs one script call per table it touches, so this is also the
/// most calls a batch of claims (or commits) costs.
pub const GROUPS: usize = 6;

/// Resolution of a remembered key's expiry. A window is at least 1 s, so rounding the expiry up
/// to the next tick keeps a key at most `window / 8` longer than its window.
pub const TICK_MS: u64 = 125;

/// Ticks count from 2026-01-01T00:00:00Z: a tick count fits the 5-byte integer encoding of a
/// listpack until 2034 (9 bytes after that).
pub const EPOCH_MS: u64 = 1_767_225_600_000;

/// Bytes of digest stored as a field.
pub const FIELD_BYTES: usize = 15;

/// Redis Cluster's slot count.
const SLOTS: u16 = 16384;

/// Where one store key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Table index, `0..GROUPS`.
    pub group: usize,
    /// Name of the key's field in its table (binary).
    pub field: [u8; FIELD_BYTES],
}

/// The 16-byte identity of a store key for the stores that keep one per key (memory,
/// embedded, PostgreSQL): the first 16 bytes of its BLAKE3 hash, 128 bits, so that two keys
/// sharing one is never a practical risk.
pub fn digest16(store_key: &str) -> [u8; 16] {
    let hash = blake3::hash(store_key.as_bytes());
    let mut digest = [0u8; 16];
    digest.copy_from_slice(&hash.as_bytes()[..16]);
    digest
}

/// `field` in lower-case hex: the name of its claim key (see `redis::scripts`).
pub fn hex(field: &[u8; FIELD_BYTES]) -> [u8; 2 * FIELD_BYTES] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 2 * FIELD_BYTES];
    for (pair, byte) in out.chunks_exact_mut(2).zip(field) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    out
}

/// The placement of `store_key`.
pub fn place(store_key: &str) -> Placement {
    let mut digest = [0u8; FIELD_BYTES + 2];
    blake3::Hasher::new()
        .update(store_key.as_bytes())
        .finalize_xof()
        .fill(&mut digest);
    let mut field = [0u8; FIELD_BYTES];
    field.copy_from_slice(&digest[..FIELD_BYTES]);
    let group = usize::from(u16::from_be_bytes([
        digest[FIELD_BYTES],
        digest[FIELD_BYTES + 1],
    ])) % GROUPS;
    Placement { group, field }
}

/// The route part of `store_key` (`{prefix}:{route}:{id}`): route names cannot contain `:`, so
/// it is the text between the prefix's `:` and the next one. A key that does not start with
/// the prefix (only `inspect` could pass one) belongs to the route `""`.
pub fn route_of<'k>(prefix: &str, store_key: &'k str) -> &'k str {
    store_key
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.split_once(':'))
        .map_or("", |(route, _)| route)
}

/// The names of one route's tables: `bases[g]` is `T` of group `g` (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// `{prefix}:{{route}/{g}/{n}}` for each group.
    pub bases: Vec<String>,
    /// `{base}:m` for each group, built once: every key of every batch names one.
    metas: Vec<Arc<str>>,
}

impl Tables {
    /// The tables of `route`. The `n` of each tag is the smallest number that puts the tag in
    /// its group's slot range, so every instance derives the same names.
    pub fn new(prefix: &str, route: &str) -> Tables {
        let bases = (0..GROUPS)
            .map(|group| {
                let low = slot_range_start(group);
                let high = slot_range_start(group + 1);
                let n = (0u32..)
                    .find(|n| {
                        let slot = slot(format!("{route}/{group}/{n}").as_bytes());
                        (low..high).contains(&slot)
                    })
                    .unwrap_or(0);
                format!("{prefix}:{{{route}/{group}/{n}}}")
            })
            .collect::<Vec<_>>();
        let metas = bases.iter().map(|b| Arc::from(format!("{b}:m"))).collect();
        Tables { bases, metas }
    }

    /// The meta hash of group `g`: the key every script call on that table declares.
    pub fn meta(&self, group: usize) -> String {
        self.metas[group].to_string()
    }

    /// [`Tables::meta`], shared rather than copied.
    pub fn meta_shared(&self, group: usize) -> Arc<str> {
        Arc::clone(&self.metas[group])
    }
}

/// Where the upgrade check records when the route's last 0.1-layout key expires.
pub fn legacy_marker(prefix: &str, route: &str) -> String {
    format!("{prefix}:{{{route}}}:legacy-until")
}

/// The `SCAN MATCH` pattern of the route's 0.1-layout keys, with glob characters of the prefix
/// escaped (route names have none).
pub fn legacy_pattern(prefix: &str, route: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + route.len() + 3);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push(':');
    pattern.push_str(route);
    pattern.push_str(":*");
    pattern
}

/// First slot of group `g`'s range (`g = GROUPS` gives the end of the last range).
fn slot_range_start(group: usize) -> u16 {
    // At most 16384 * 6: no overflow in u32, and the quotient fits u16.
    (u32::from(SLOTS) * group as u32 / GROUPS as u32) as u16
}

/// Redis Cluster's slot of a key: CRC16/XMODEM of its hash tag (or of the whole key) mod 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// The tick in which a key committed at `now_ms` with `window` must still be remembered: the
/// expiry rounded up to a whole tick.
pub fn expiry_tick(now_ms: u64, window_ms: u64) -> u64 {
    (now_ms + window_ms)
        .saturating_sub(EPOCH_MS)
        .div_ceil(TICK_MS)
}

/// Milliseconds (Unix time) at which a key with expiry `tick` is forgotten.
pub fn tick_to_ms(tick: u64) -> u64 {
    EPOCH_MS + tick * TICK_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::cluster_routing::Slot;

    #[test]
    fn hex_spells_every_byte_in_two_lower_case_digits() {
        let field: [u8; FIELD_BYTES] = std::array::from_fn(|i| (i as u8) * 17 + 0x0f);
        let want: String = field.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(std::str::from_utf8(&hex(&field)).unwrap(), want);
    }

    #[test]
    fn slot_is_the_one_redis_computes() {
        for key in [
            "dedupd:{orders/0/3}:m",
            "plain",
            "a{}b",
            "{}{x}",
            "x{y",
            "dedupd:orders:id",
        ] {
            assert_eq!(
                Slot::for_key(key),
                Slot::new(slot(key.as_bytes())).expect("in range"),
                "{key}"
            );
        }
    }

    #[test]
    fn each_group_lands_in_its_own_slot_range_and_all_keys_of_a_table_share_it() {
        let tables = Tables::new("dedupd", "orders");
        for (g, base) in tables.bases.iter().enumerate() {
            let s = slot(base.as_bytes());
            assert!(
                (slot_range_start(g)..slot_range_start(g + 1)).contains(&s),
                "{base}: slot {s}"
            );
            for name in [
                tables.meta(g),
                format!("{base}:17"),
                format!("{base}:c:xyz"),
            ] {
                assert_eq!(slot(name.as_bytes()), s, "{name}");
            }
        }
        // Deterministic: every instance derives the same names.
        assert_eq!(tables, Tables::new("dedupd", "orders"));
        assert_ne!(tables.bases[0], Tables::new("dedupd", "billing").bases[0]);
    }

    #[test]
    fn groups_are_even_and_fields_differ() {
        let mut counts = [0u32; GROUPS];
        let mut fields = std::collections::HashSet::new();
        for i in 0..60_000 {
            let p = place(&format!("dedupd:orders:{i}"));
            counts[p.group] += 1;
            assert!(fields.insert(p.field));
        }
        for c in counts {
            // 10,000 expected, standard deviation about 91.
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(place("dedupd:orders:1"), place("dedupd:orders:1"));
        assert_ne!(place("dedupd:orders:1"), place("dedupd:billing:1"));
    }

    #[test]
    fn route_is_the_segment_after_the_prefix() {
        assert_eq!(route_of("dedupd", "dedupd:orders:a:b"), "orders");
        assert_eq!(route_of("a:b", "a:b:orders:x"), "orders");
        assert_eq!(route_of("dedupd", "other:orders:x"), "");
        assert_eq!(route_of("dedupd", "dedupd:orders"), "");
    }

    #[test]
    fn no_name_of_the_layout_matches_the_legacy_pattern() {
        let tables = Tables::new("dedupd", "orders");
        let marker = legacy_marker("dedupd", "orders");
        for name in [tables.meta(0), format!("{}:3", tables.bases[5]), marker] {
            assert!(!name.starts_with("dedupd:orders:"), "{name}");
        }
        assert_eq!(legacy_pattern("a*b[", "r"), "a\\*b\\[:r:*");
    }

    #[test]
    fn expiry_is_at_least_the_window_and_at_most_an_eighth_more() {
        for window_ms in [1_000u64, 1_001, 7_999, 60_000, 86_400_000] {
            for now in [EPOCH_MS + 1, EPOCH_MS + 124, EPOCH_MS + 10_000_007] {
                let forgotten = tick_to_ms(expiry_tick(now, window_ms));
                assert!(forgotten >= now + window_ms, "{window_ms} {now}");
                assert!(
                    forgotten <= now + window_ms + window_ms / 8,
                    "{window_ms} {now}"
                );
            }
        }
    }
}
