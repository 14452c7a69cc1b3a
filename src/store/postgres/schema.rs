//! What dedupd keeps in PostgreSQL and the SQL that reads and writes it: the table's name and
//! shape, the one statement each operation sends, and what an administrator runs when dedupd
//! may not create the table itself. Pure text and pure functions; `mod.rs` sends them.
//!
//! # One table per key prefix
//!
//! A `store.key_prefix` is the unit of sharing (every instance with the same prefix shares its
//! memory), so it gets one table; operators with two prefixes get two tables, and dropping a
//! table forgets exactly one prefix. PostgreSQL truncates identifiers at 63 bytes, and a prefix
//! may be 64 bytes of anything but whitespace and braces, so the name is derived
//! ([`table_name`]): the prefix, lowercased letters, digits and `_` kept and everything else
//! turned into `_`, then `_keys`; when that changed the prefix or would not fit, the kept part
//! is cut to 45 bytes and 12 hex digits of the prefix's BLAKE3 hash go before `_keys`, so two
//! prefixes never share a table. The name is always quoted.
//!
//! # One row per remembered key
//!
//! | column | type | bytes | holds |
//! |---|---|---|---|
//! | `expires_at` | `timestamptz` | 8 | lease end while in flight, window end when done |
//! | `route` | `int4` | 4 | [`route_id`]: the route's name hashed, for per-route counts |
//! | `key` | `uuid` (primary key) | 16 | the first 16 bytes of the BLAKE3 hash of the store key |
//! | `owner` | `text`, NULL = done | 0 when done | the owner token while in flight |
//! | `body` | `int8`, NULL = none | 8 (+4 padding) when set | a done key's body digest |
//!
//! A done row is 24 bytes of tuple header plus 28 of data, 56 bytes aligned, plus a 4-byte line
//! pointer; its primary-key entry is 16 bytes of uuid plus an 8-byte index tuple header, plus a
//! line pointer. The digest is stored as a `uuid` rather than a `bytea` because a `uuid` is
//! fixed-length: no length byte, so the index entry is 24 bytes instead of 32. The first four
//! columns are ordered widest first so nothing is padded; a route id costs nothing (the row is
//! 56 bytes with or without it), where a route name in `text` would cost 8 more bytes for
//! names longer than 4 characters. A 16-byte digest collides with another key of the table
//! with a chance of about n²/2¹²⁹ for n keys: never, in practice (see the memory store, which
//! keeps the same).
//!
//! `body` holds the [`BodyDigest`](crate::store::BodyDigest) of the key's first committed copy,
//! its 64 bits read as a signed `int8` (PostgreSQL has no unsigned integers); NULL when the
//! copy had none (`key = "body"`) or the key is in flight. A done row with a digest is 64 bytes:
//! the `int8` must start on an 8-byte boundary, 4 bytes after the uuid ends. It is the last
//! column because `ALTER TABLE … ADD COLUMN` appends, so a table of 0.4 and a new one have the
//! same rows; first after `expires_at` it would save nothing (36 bytes of data also round up
//! to 64). A NULL `body` costs nothing: every row of this table already has a null bitmap
//! (done rows for `owner`, claims for `body`) within the 24-byte header.
//!
//! Every key is written twice: claimed (a row with the owner token, 72 bytes), then committed
//! (the done row, 56 bytes, or 64 with a digest), and under MVCC the committed row is a new
//! version of the claimed one. `fillfactor = 60` leaves room on each page for the done versions of the claims
//! inserted there, so most commits stay on their page as heap-only tuples: no second
//! primary-key entry per key, and the claim version is pruned on the page without waiting for
//! a VACUUM. No index on `expires_at`: it would cost about 20 bytes per key and make every
//! commit a non-HOT update; the sweeper walks the table by page instead (see `upkeep`).
//!
//! Measured (`measure_postgres_bytes_per_remembered_key` in `tests/postgres.rs`, PostgreSQL
//! 15, batches of 200): `pg_total_relation_size` growth between 20,000 and 120,000 keys; and
//! the size per key after a refill: once those keys expired, the sweeper deleted them and a
//! VACUUM ran (which hands the emptied heap back to the OS, while the primary key keeps its
//! emptied pages until a later VACUUM recycles them), 120,000 new keys were written:
//!
//! | fillfactor | growth B/key (heap + primary key) | after a refill B/key |
//! |---:|---:|---:|
//! | 50 | 205 (164 + 41) | 244 |
//! | **60** | **189–192 (143 + 46–49)** | **235** |
//! | 75 | 197 (141 + 56) | 253 |
//! | 90 | 206 (139 + 67) | 269 |
//! | 100 | 207 (137 + 70) | 279 |
//!
//! The heap holds both versions of every key until a VACUUM records the space of the dead
//! claim versions as free (pruning frees it on the page, but new rows go to pages the
//! free-space map names), which is why it stays near 140 bytes per key. Under steady traffic
//! (keys expiring while new ones arrive) autovacuum lets new rows reuse that space and the
//! primary key's pages; that was not measured.
//!
//! The figures above are of done rows without a body digest. With one in every done row (as
//! dedupd 0.5 writes them unless `key = "body"`), measured the same way at fillfactor 60 on the
//! same server as a run without: growth 203–204 B/key (heap 154 + primary key 50–51) against
//! 189 (143 + 45), and 252 B/key after a refill against 233. The heap grows by the digest's 8
//! bytes and page packing; the primary key presumably by a few commits more that no longer
//! fit on their claim's page as a heap-only tuple and so add a second index entry.
//!
//! # Tables of dedupd 0.4
//!
//! 0.4 created the table without `body`. The first claim, commit, renewal, release or ping of a
//! process that finds the column missing adds it (`ALTER TABLE … ADD COLUMN IF NOT EXISTS`, see
//! [`upgrade_table`]): a nullable column without a default is a change of the catalog only,
//! instant whatever the table holds, and the keys 0.4 wrote read as done without a digest,
//! which can only answer `Done`. The `ALTER` waits for the exclusive lock of the table, so for
//! the batches of other instances that hold its rows, within `statement_timeout`. Only the
//! table's owner may alter it: any other role is told the statement to run. Reads do not alter
//! the table (nor create it), and a 0.4 instance still running alongside keeps working, since
//! every statement names its columns; should it create the table again after a `DROP`, the next
//! statement that fails on the missing column makes the store add it again.
//!
//! # Conflicts and sliding windows
//!
//! A claim that finds a live done key compares the copy's digest with `body` in the same
//! statement that locks the row (code 5, `Conflict`, when both are known and differ), and
//! with a sliding window moves `expires_at` to `greatest(expires_at, now + window)` in that
//! statement's `UPDATE`, so a window only grows and two instances sliding one key cannot undo
//! each other. A slide writes a new row version (a heap-only one, as `expires_at` has no
//! index) for each duplicate that lengthens its window, so it costs what a commit costs; a
//! duplicate whose window is already longer writes nothing. A commit that finds the key done
//! leaves the row untouched, digest and window alike.
//!
//! # Plans
//!
//! Every statement of a batch finds its rows through the primary key (or, for the sweeper, by
//! TID range), however many rows the planner believes the table has. The sessions run with
//! `enable_seqscan = off`, because that belief can be badly wrong: after the sweeper emptied
//! the table and a VACUUM recorded it as empty, the prepared statements' generic plans read
//! the whole table per batch (measured: a commit of 200 keys went from 1.5 ms to 100 ms as the
//! table refilled to 60,000 rows, until autovacuum's ANALYZE). The row counts of `size` read
//! every page on purpose, through `TABLESAMPLE SYSTEM (100)`, which that setting leaves alone.
//!
//! Each `UPDATE … FROM` joins the table with one CTE only (`decided`, which carries all the
//! update needs): with a second CTE in its `FROM` the generic plan joined them in a nested
//! loop that compared each key of the batch with every other (160,000 rows for a 400-key
//! commit: 27–54 ms per commit instead of 5, and the throughput at 0% duplicates down by a
//! third). The test `batch_statements_do_work_linear_in_the_batch` bounds every plan node.
//!
//! # Clocks
//!
//! Every expiry is computed and compared by the server (`clock_timestamp()`), never by dedupd,
//! so instances with skewed clocks agree, as they do on Redis TTLs. `clock_timestamp()` rather
//! than `now()`: a statement that waited for a row lock decides on the time after the wait.
//!
//! # Why one statement per operation is safe (READ COMMITTED)
//!
//! Claim and commit must read what a key holds and decide what to write in one atomic step. A
//! single statement does it with data-modifying CTEs:
//!
//! 1. `locked`: `SELECT … FOR UPDATE` of the batch's existing rows, in key order (so two
//!    instances' batches lock in the same order and do not deadlock). Under READ COMMITTED a
//!    row locked after a wait is re-read in its newest committed version, so each decision is
//!    made on the row as it is now and nobody can change it before the statement commits.
//! 2. `decided`: the decision per locked row (the same rules as the memory store and the Redis
//!    scripts, `done_or_conflict` included), materialized once.
//! 3. `upd`: the rows to overwrite (or, for a sliding claim, whose window to lengthen),
//!    updated; `ins`: the keys that had no row, inserted with `ON CONFLICT DO NOTHING`.
//! 4. The answer per key. A key that had no row in the statement's snapshot but got one from a
//!    concurrent statement before our insert (a race between two instances on a new key) is
//!    neither inserted nor locked: it is answered [`RETRY`], and the caller sends a second
//!    statement for those keys alone, whose snapshot sees the row. So two instances claiming
//!    one new key at once get exactly one `Claimed` (the insert that won the unique index) and
//!    one `InFlightElsewhere`.
//!
//! Release and renew are single `DELETE` / `UPDATE … WHERE owner = $token`: PostgreSQL re-checks
//! the condition on the newest version of a row it had to wait for, which is a compare-and-set.

/// The answer of a claim or commit for a key that changed hands between the statement's
/// snapshot and its insert: ask again (see the module docs).
pub const RETRY: i32 = 9;

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_IDENT: usize = 63;

/// Bytes of the prefix kept in a name that carries a hash: 45 + `_` + 12 + `_keys` = 63.
const KEPT: usize = 45;

/// The table that holds the keys of `key_prefix` (unquoted; see the module docs).
pub fn table_name(key_prefix: &str) -> String {
    let sanitized: String = key_prefix
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            _ => '_',
        })
        .collect();
    let plain = format!("{sanitized}_keys");
    if sanitized == key_prefix && plain.len() <= MAX_IDENT {
        return plain;
    }
    let hash = blake3::hash(key_prefix.as_bytes());
    let hex: String = hash.as_bytes()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // `sanitized` is ASCII, so any byte index is a char boundary.
    let kept = &sanitized[..sanitized.len().min(KEPT)];
    format!("{kept}_{hex}_keys")
}

/// `name` as a quoted SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a quoted SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The `route` column of a key of `route`: the first 4 bytes of the name's BLAKE3 hash. Two
/// routes of one prefix share an id with a chance of 1 in 4 billion; they would then only
/// share their `dedupd_store_keys` count, never keys (the digest covers the route too).
pub fn route_id(route: &str) -> i32 {
    let hash = blake3::hash(route.as_bytes());
    let [a, b, c, d, ..] = *hash.as_bytes();
    i32::from_le_bytes([a, b, c, d])
}

/// The 16-byte identity of a store key, sent as a `uuid`.
pub use crate::store::layout::digest16 as digest;

/// The statements of one table, built once per store.
#[derive(Debug, Clone)]
pub struct Statements {
    /// Creates the table (see [`create_table`]).
    pub create: String,
    /// Adds the `body` column to a table created by dedupd 0.4 (see [`upgrade_table`]).
    pub upgrade: String,
    /// `$1` the quoted table name: (exists, may read and write it, may create it, role, schema,
    /// has the `body` column).
    pub probe: &'static str,
    pub claim: String,
    pub commit: String,
    pub renew: String,
    pub release: String,
    pub inspect: String,
    pub forget: String,
    /// `$1` quoted table name: (total bytes, pages), NULLs when the table is missing.
    pub measure: &'static str,
    /// Live rows per route id (`$1`) in a sample of `$2` percent of the table's pages: 100
    /// reads them all, for an exact count.
    pub count: String,
    pub sweep: String,
}

impl Statements {
    /// The statements of table `table` (unquoted) for `key_prefix`.
    pub fn new(table: &str, key_prefix: &str) -> Self {
        let t = quote_ident(table);
        Statements {
            create: create_table(table, key_prefix),
            upgrade: upgrade_table(table),
            probe: PROBE,
            claim: CLAIM.replace("{t}", &t),
            commit: COMMIT.replace("{t}", &t),
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $3::int8 * interval '1 millisecond' \
                 WHERE key = ANY($1::uuid[]) AND owner = $2::text AND expires_at > clock_timestamp() \
                 RETURNING key"
            ),
            release: format!(
                "DELETE FROM {t} WHERE key = ANY($1::uuid[]) AND owner = $2::text \
                 AND expires_at > clock_timestamp() RETURNING key"
            ),
            inspect: format!(
                "SELECT owner, greatest(0, (extract(epoch FROM expires_at - clock_timestamp()) \
                 * 1000)::int8) FROM {t} WHERE key = $1::uuid AND expires_at > clock_timestamp()"
            ),
            forget: format!(
                "DELETE FROM {t} WHERE key = $1::uuid RETURNING expires_at > clock_timestamp()"
            ),
            measure: MEASURE,
            count: format!(
                "SELECT route, count(*) FROM {t} TABLESAMPLE SYSTEM ($2::float4) \
                 WHERE route = ANY($1::int4[]) AND expires_at > clock_timestamp() GROUP BY route"
            ),
            sweep: SWEEP.replace("{t}", &t),
        }
    }
}

/// The DDL of the table of `key_prefix`, also printed for an administrator to run.
pub fn create_table(table: &str, key_prefix: &str) -> String {
    let t = quote_ident(table);
    let comment = quote_literal(&format!(
        "dedupd: keys remembered under key_prefix {key_prefix:?}"
    ));
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (expires_at timestamptz NOT NULL, route int4 NOT NULL, \
         key uuid NOT NULL PRIMARY KEY, owner text, body int8) WITH (fillfactor = 60); \
         COMMENT ON TABLE {t} IS {comment};"
    )
}

/// The DDL that brings a table of dedupd 0.4 (no `body` column) up to date, also printed for
/// an administrator to run when the role does not own the table. A nullable column without
/// a default is a catalog change only: no row is rewritten, whatever the table holds.
pub fn upgrade_table(table: &str) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS body int8;",
        quote_ident(table)
    )
}

/// The grant an administrator runs so that `role` can use a table it did not create.
pub fn grant(table: &str, role: &str) -> String {
    format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {};",
        quote_ident(table),
        quote_ident(role)
    )
}

/// Does the table exist, may this role use it, may it create it? One round trip at setup.
const PROBE: &str = "SELECT t IS NOT NULL, \
    t IS NOT NULL AND has_table_privilege(t, 'SELECT') AND has_table_privilege(t, 'INSERT') \
      AND has_table_privilege(t, 'UPDATE') AND has_table_privilege(t, 'DELETE'), \
    current_schema() IS NOT NULL AND has_schema_privilege(current_schema(), 'CREATE'), \
    current_user::text, coalesce(current_schema()::text, ''), \
    EXISTS (SELECT FROM pg_attribute WHERE attrelid = t AND attname = 'body' AND NOT attisdropped) \
    FROM to_regclass($1::text) AS t";

/// Claim codes: 0 claimed, 1 done, 2 ours, 3 taken over, 4 in flight elsewhere (with the lease
/// left in ms), 5 conflict, [`RETRY`]; and for a live done row (1 or 5), its body digest.
/// `$1` keys, `$2` their route ids, `$3` each key's body digest (its first copy's in the
/// batch), `$4` our token, `$5` our instance prefix `{instance}:`, `$6` our epoch, `$7` the
/// lease in ms, `$8` the sliding window in ms (NULL: fixed windows), `$9`/`$10` the other
/// digests of keys repeated in the batch with another body, as (key number, digest) pairs.
///
/// A token of our instance is "an older epoch" when what follows the prefix is all digits and
/// numerically less than ours (as `is_older_epoch_of`); `left`/`substr` rather than `LIKE`, whose
/// wildcards an instance id could contain.
///
/// `(a <> b) IS NOT TRUE` is `done_or_conflict` answering `Done`: equal, or either unknown. A
/// done row slides when any copy of its key in the batch is such a duplicate (the memory store
/// decides each copy in turn, and one `Done` among them slides the key), and only when that
/// lengthens its window: a row version per duplicate that changes nothing would only bloat
/// the heap.
const CLAIM: &str = "WITH input AS (
    SELECT k, r, b, n FROM unnest($1::uuid[], $2::int4[], $3::int8[]) WITH ORDINALITY AS i(k, r, b, n)
), locked AS (
    SELECT key, owner, expires_at, body FROM {t} WHERE key = ANY($1::uuid[]) ORDER BY key FOR UPDATE
), coded AS (
    SELECT l.key, l.expires_at, l.body, i.n, CASE
        WHEN l.expires_at <= clock_timestamp() THEN 0
        WHEN l.owner IS NULL AND l.body <> i.b THEN 5
        WHEN l.owner IS NULL THEN 1
        WHEN l.owner = $4::text THEN 2
        WHEN left(l.owner, length($5::text)) = $5::text
             AND substr(l.owner, length($5::text) + 1) ~ '^[0-9]{1,20}$'
             AND substr(l.owner, length($5::text) + 1)::numeric < $6::int8::numeric THEN 3
        ELSE 4 END AS code
    FROM locked l JOIN input i ON i.k = l.key
), decided AS MATERIALIZED (
    SELECT key, expires_at, body, code,
        code IN (1, 5) AND $8::int8 IS NOT NULL
        AND expires_at < clock_timestamp() + $8::int8 * interval '1 millisecond'
        AND (code = 1 OR EXISTS (
            SELECT FROM unnest($9::int4[], $10::int8[]) AS x(n, b)
            WHERE x.n = coded.n AND (coded.body <> x.b) IS NOT TRUE)) AS slides
    FROM coded
), upd AS (
    UPDATE {t} AS t SET
        owner = CASE WHEN d.code IN (1, 5) THEN NULL ELSE $4::text END,
        body = CASE WHEN d.code IN (1, 5) THEN t.body END,
        expires_at = CASE WHEN d.code IN (1, 5)
            THEN greatest(t.expires_at, clock_timestamp() + $8::int8 * interval '1 millisecond')
            ELSE clock_timestamp() + $7::int8 * interval '1 millisecond' END
    FROM decided d
    WHERE t.key = d.key AND t.key = ANY($1::uuid[]) AND (d.code IN (0, 2, 3) OR d.slides)
    RETURNING t.key
), ins AS (
    INSERT INTO {t} (expires_at, route, key, owner)
    SELECT clock_timestamp() + $7::int8 * interval '1 millisecond', r, k, $4::text FROM input
    WHERE k NOT IN (SELECT key FROM locked)
    ORDER BY k
    ON CONFLICT (key) DO NOTHING
    RETURNING key
)
SELECT i.n, CASE
        WHEN ins.key IS NOT NULL THEN 0
        WHEN upd.key IS NOT NULL THEN d.code
        WHEN d.code IN (1, 4, 5) THEN d.code
        ELSE 9 END::int4,
    CASE WHEN d.code = 4 AND upd.key IS NULL THEN
        greatest(0, (extract(epoch FROM d.expires_at - clock_timestamp()) * 1000)::int8) END,
    CASE WHEN d.code IN (1, 5) THEN d.body END
FROM input i
LEFT JOIN ins ON ins.key = i.k
LEFT JOIN upd ON upd.key = i.k
LEFT JOIN decided d ON d.key = i.k";

/// Commit codes (as `CommitOutcome::from_code`): 0 committed, 1 restored (nothing live was
/// there), 2 done elsewhere (left alone, with its window and its digest), 3 overrode another
/// owner's claim, [`RETRY`]. `$1` keys, `$2` route ids, `$3` each key's body digest (its first
/// copy's in the batch), `$4` our token, `$5` the window in ms.
const COMMIT: &str = "WITH input AS (
    SELECT k, r, b, n FROM unnest($1::uuid[], $2::int4[], $3::int8[]) WITH ORDINALITY AS i(k, r, b, n)
), locked AS (
    SELECT key, owner, expires_at FROM {t} WHERE key = ANY($1::uuid[]) ORDER BY key FOR UPDATE
), decided AS MATERIALIZED (
    SELECT l.key, i.b, CASE
        WHEN l.expires_at <= clock_timestamp() THEN 1
        WHEN l.owner IS NULL THEN 2
        WHEN l.owner = $4::text THEN 0
        ELSE 3 END AS code
    FROM locked l JOIN input i ON i.k = l.key
), upd AS (
    UPDATE {t} AS t SET owner = NULL, body = d.b,
        expires_at = clock_timestamp() + $5::int8 * interval '1 millisecond'
    FROM decided d
    WHERE t.key = d.key AND t.key = ANY($1::uuid[]) AND d.code <> 2
    RETURNING t.key
), ins AS (
    INSERT INTO {t} (expires_at, route, key, owner, body)
    SELECT clock_timestamp() + $5::int8 * interval '1 millisecond', r, k, NULL, b FROM input
    WHERE k NOT IN (SELECT key FROM locked)
    ORDER BY k
    ON CONFLICT (key) DO NOTHING
    RETURNING key
)
SELECT i.n, CASE
        WHEN ins.key IS NOT NULL THEN 1
        WHEN upd.key IS NOT NULL THEN d.code
        WHEN d.code = 2 THEN 2
        ELSE 9 END::int4,
    NULL::int8,
    NULL::int8
FROM input i
LEFT JOIN ins ON ins.key = i.k
LEFT JOIN upd ON upd.key = i.k
LEFT JOIN decided d ON d.key = i.k";

/// `$1` quoted table name: its total size (heap, index, free-space and visibility maps) and
/// its heap pages; NULLs when it does not exist.
const MEASURE: &str = "SELECT pg_total_relation_size(t)::int8, \
    (pg_relation_size(t) / current_setting('block_size')::int8)::int8 \
    FROM to_regclass($1::text) AS t";

/// Deletes the expired rows of heap pages `$1` to `$2` (exclusive): TID range scans, so each
/// chunk reads only its pages, joined by hash (a `ctid = ANY(array)` filter would compare
/// every row with every doomed one). Rows locked by a claim in progress are skipped rather
/// than waited for, so the sweeper never holds a lock while waiting for one (no deadlock with
/// a batch that locks in key order); it meets them again on its next pass.
const SWEEP: &str = "WITH doomed AS (
    SELECT ctid AS tid FROM {t}
    WHERE ctid >= format('(%s,0)', $1::int8)::tid AND ctid < format('(%s,0)', $2::int8)::tid
      AND expires_at <= clock_timestamp()
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {t} AS t USING doomed
WHERE t.ctid = doomed.tid
  AND t.ctid >= format('(%s,0)', $1::int8)::tid AND t.ctid < format('(%s,0)', $2::int8)::tid";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_prefix_keeps_its_name() {
        assert_eq!(table_name("dedupd"), "dedupd_keys");
        assert_eq!(table_name("orders_2"), "orders_2_keys");
    }

    #[test]
    fn a_changed_or_long_prefix_gets_a_hash_and_fits() {
        for prefix in [
            "Dedupd",
            "dedupd-test-pg-older_epoch_of_same_instance_is_taken_over-0123456789abcdef",
            "a:b",
            "ä",
            &"x".repeat(64),
            "x\"; DROP TABLE y; --",
        ] {
            let name = table_name(prefix);
            assert!(name.len() <= MAX_IDENT, "{name}");
            assert!(name.ends_with("_keys"), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
            assert_eq!(name, table_name(prefix), "deterministic");
        }
        // Prefixes that sanitize alike, or share their first 45 bytes, still differ.
        assert_ne!(table_name("a-b"), table_name("a_b"));
        assert_ne!(table_name("a-b"), table_name("a:b"));
        assert_ne!(table_name("Orders"), table_name("orders"));
        let long = "y".repeat(60);
        assert_ne!(
            table_name(&format!("{long}1")),
            table_name(&format!("{long}2"))
        );
        // A 59-byte plain prefix fits as it is; one more byte does not.
        assert_eq!(
            table_name(&"z".repeat(58)),
            format!("{}_keys", "z".repeat(58))
        );
        assert!(table_name(&"z".repeat(59)).len() <= MAX_IDENT);
        assert_ne!(
            table_name(&"z".repeat(59)),
            format!("{}_keys", "z".repeat(59))
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert!(create_table("t", "it's")
            .contains("'dedupd: keys remembered under key_prefix \"it''s\"'"));
        assert_eq!(
            grant("t", "app"),
            "GRANT SELECT, INSERT, UPDATE, DELETE ON \"t\" TO \"app\";"
        );
    }

    /// Every batch statement does work linear in its batch, on the generic plan a prepared
    /// statement runs after its fifth execution: `EXPLAIN ANALYZE` of each step of a 400-key
    /// batch's life (claimed, renewed, met by another instance, committed, met again as
    /// duplicates, sliding, and as conflicts, released), among 20,000 other keys, has no plan
    /// node that handles more than four rows per key (rows out, plus rows filtered out, times
    /// loops). A commit whose `UPDATE` joined two CTEs compared every key with every other:
    /// 160,000 rows.
    #[tokio::test]
    async fn batch_statements_do_work_linear_in_the_batch() {
        const N: usize = 400;
        let (client, connection) = tokio_postgres::connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            tokio_postgres::NoTls,
        )
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
        tokio::spawn(connection);
        let table = format!("dedupd_test_plans_{}_keys", std::process::id());
        let sql = Statements::new(&table, "dedupd_test_plans");
        let t = quote_ident(&table);
        let setup = format!(
            "SET enable_seqscan = off; DROP TABLE IF EXISTS {t}; {create} \
             INSERT INTO {t} (expires_at, route, key, owner, body) \
               SELECT clock_timestamp() + interval '1 hour', 1, gen_random_uuid(), NULL, i \
               FROM generate_series(1, 20000) AS i; \
             ANALYZE {t}; \
             PREPARE claim(uuid[], int4[], int8[], text, text, int8, int8, int8, int4[], int8[]) \
               AS {claim}; \
             PREPARE commit(uuid[], int4[], int8[], text, int8) AS {commit}; \
             PREPARE renew(uuid[], text, int8) AS {renew}; \
             PREPARE release(uuid[], text) AS {release}; \
             SET plan_cache_mode = force_generic_plan;",
            create = sql.create,
            claim = sql.claim,
            commit = sql.commit,
            renew = sql.renew,
            release = sql.release,
        );
        client.batch_execute(&setup).await.expect("set-up");
        let uuids = "SELECT array_agg(gen_random_uuid())::text FROM generate_series(1, $1::int4)";
        let n = i32::try_from(N).expect("N fits");
        let keys: String = client.query_one(uuids, &[&n]).await.expect("keys").get(0);
        let fresh: String = client.query_one(uuids, &[&n]).await.expect("keys").get(0);
        let array = |f: &dyn Fn(usize) -> String| {
            format!("{{{}}}", (0..N).map(f).collect::<Vec<_>>().join(","))
        };
        let routes = array(&|_| "1".into());
        let bodies = array(&|i| (i + 1).to_string());
        let others = array(&|i| (i + 1_000_000).to_string());
        let claim = |keys: &str, bodies: &str, owner: &str, slide: &str| {
            format!(
                "claim('{keys}', '{routes}', '{bodies}', '{owner}:1', '{owner}:', 1, 30000, \
                 {slide}, '{{}}', '{{}}')"
            )
        };
        let steps = [
            ("claim of new keys", claim(&keys, &bodies, "a", "NULL")),
            ("renewal", format!("renew('{keys}', 'a:1', 30000)")),
            (
                "claim of keys in flight",
                claim(&keys, &bodies, "b", "NULL"),
            ),
            (
                "commit",
                format!("commit('{keys}', '{routes}', '{bodies}', 'a:1', 3600000)"),
            ),
            ("claim of done keys", claim(&keys, &bodies, "b", "NULL")),
            (
                "sliding claim of done keys",
                claim(&keys, &bodies, "b", "7200000"),
            ),
            ("claim of conflicts", claim(&keys, &others, "b", "7200000")),
            (
                "commit of done keys",
                format!("commit('{keys}', '{routes}', '{bodies}', 'b:1', 3600000)"),
            ),
            (
                "commit of absent keys",
                format!("commit('{fresh}', '{routes}', '{bodies}', 'a:1', 3600000)"),
            ),
            (
                "release of keys not ours",
                format!("release('{keys}', 'a:1')"),
            ),
        ];
        let mut worst = Vec::new();
        for (step, execute) in steps {
            // The simple protocol answers in text; the extended one would want a JSON type.
            let answer = client
                .simple_query(&format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {execute}"))
                .await
                .unwrap_or_else(|e| panic!("{step}: {e}"));
            let plan = answer
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                    _ => None,
                })
                .expect("EXPLAIN answers a row");
            let plan: serde_json::Value = serde_json::from_str(plan).expect("JSON plan");
            worst.push((step, heaviest_node(&plan[0]["Plan"])));
        }
        client
            .batch_execute(&format!("DROP TABLE {t}"))
            .await
            .expect("drop the test table");
        for (step, (rows, node)) in worst {
            assert!(
                rows <= 4.0 * N as f64,
                "{step}: plan node {node} handled {rows} rows for a batch of {N} keys"
            );
        }
    }

    /// The node of `plan` (and its children) that handles the most rows, and how many.
    fn heaviest_node(plan: &serde_json::Value) -> (f64, String) {
        let field = |name: &str| plan[name].as_f64().unwrap_or(0.0);
        let rows = (field("Actual Rows")
            + field("Rows Removed by Filter")
            + field("Rows Removed by Join Filter")
            + field("Rows Removed by Index Recheck"))
            * field("Actual Loops");
        let here = (rows, plan["Node Type"].as_str().unwrap_or("?").to_owned());
        plan["Plans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(heaviest_node)
            .fold(here, |a, b| if b.0 > a.0 { b } else { a })
    }

    #[test]
    fn route_ids_and_digests_are_stable_and_differ() {
        assert_eq!(route_id("orders"), route_id("orders"));
        assert_ne!(route_id("orders"), route_id("payments"));
        assert_eq!(digest("dd:r:1"), digest("dd:r:1"));
        assert_ne!(digest("dd:r:1"), digest("dd:r:2"));
    }
}
