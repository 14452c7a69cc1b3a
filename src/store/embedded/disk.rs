//! The embedded store's file: done keys in redb tables, one per route (the parent module says
//! why this layout and what it costs). Everything here blocks on the disk: call it from
//! `spawn_blocking` only.
//!
//! | table | key | value |
//! |---|---|---|
//! | `done:{route}` | 16-byte digest of the store key | (expiry, in ticks of `layout::TICK_MS` since `layout::EPOCH_MS` (u32); the first copy's body digest, 0 for none (u64)) |
//! | `done` | the same, for keys of no route (not `{prefix}:{route}:{id}`) | the same |
//! | `meta` | `layout` | [`LAYOUT`] |
//!
//! Layout 1 (dedupd 0.4) valued keys by the expiry alone; opening such a file upgrades it in
//! place, in one write transaction, to layout 2 (every key without a body digest).
//!
//! Route names never contain `:`, so `done:{route}` cannot collide with `done` or `meta`.

use std::collections::HashMap;
use std::fmt::Display;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{
    Database, DatabaseError, Durability, ReadOnlyTable, ReadTransaction, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableError, TableHandle,
};

use super::claims::Digest;
use crate::store::StoreError;

/// The version of this layout, written at the first open: a later dedupd that changes it
/// knows what it reads, and this one refuses a file written in a layout it does not know.
/// Layout 1 (0.4: expiry only) is upgraded at open.
pub const LAYOUT: u64 = 2;

/// The file in the store's directory.
pub const FILE_NAME: &str = "dedupd.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NO_ROUTE: &str = "done";
const ROUTE_PREFIX: &str = "done:";

/// Keys a sweep step reads at most: about a millisecond of reading, so a commit never waits
/// long behind the sweeper's write.
pub const SWEEP_CHUNK: usize = 4096;

/// A done key's value: its expiry tick and its first copy's body digest (0: none).
pub type Entry = (u32, u64);

type DoneTable<'a> = TableDefinition<'a, Digest, Entry>;

/// Tables of layout 1: the expiry alone.
type DoneTableV1<'a> = TableDefinition<'a, Digest, u32>;

/// The table of `route`'s done keys (`""`: keys of no route).
pub fn table_name(route: &str) -> String {
    if route.is_empty() {
        NO_ROUTE.to_owned()
    } else {
        format!("{ROUTE_PREFIX}{route}")
    }
}

fn is_done_table(name: &str) -> bool {
    name == NO_ROUTE || name.starts_with(ROUTE_PREFIX)
}

/// Whether redb refuses every later operation after `e` until the file is opened again: an
/// I/O error (a full disk, a failed sync) leaves it answering `PreviousIo` from then on.
fn needs_reopen(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

/// Why a file could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Another process holds the file's lock.
    Locked,
    /// Anything else, said in words.
    Other(String),
}

/// The open store file.
pub struct Disk {
    db: Database,
    file: PathBuf,
    /// Set by an error after which redb answers nothing until the file is opened again.
    broken: AtomicBool,
}

impl Disk {
    /// Opens (or creates) `file`, taking its lock (redb's `flock`), and checks its layout.
    /// After a crash redb first repairs the file (walks its trees to rebuild the free-page
    /// state: about 50 ms per million keys, measured in the parent module).
    pub fn open(file: &Path) -> Result<Disk, OpenError> {
        let db = Database::builder()
            // Commits on format 3 cost half as much at a million keys (see the parent
            // module), and redb 3 and later read it as it is.
            .create_with_file_format_v3(true)
            .create(file)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => OpenError::Locked,
                other => OpenError::Other(other.to_string()),
            })?;
        let disk = Disk {
            db,
            file: file.to_owned(),
            broken: AtomicBool::new(false),
        };
        disk.check_layout()
            .map_err(|e| OpenError::Other(e.to_string()))?;
        Ok(disk)
    }

    /// An error of the store file, with what was being done; marks the file for reopening
    /// when redb will refuse everything after it.
    fn failed(&self, what: impl Display, e: impl Into<redb::Error>) -> StoreError {
        let e = e.into();
        if needs_reopen(&e) {
            self.broken.store(true, Ordering::Relaxed);
        }
        StoreError::Embedded(format!("{what}: {e}"))
    }

    /// Whether the file must be closed and opened again before it can be used.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Marks the file for reopening, as an I/O error would.
    #[cfg(test)]
    pub fn break_for_test(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    fn check_layout(&self) -> Result<(), StoreError> {
        let what = "writing the layout version";
        let tx = self.db.begin_write().map_err(|e| self.failed(what, e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.failed(what, e))?;
            let found = meta
                .get("layout")
                .map_err(|e| self.failed(what, e))?
                .map(|v| v.value());
            match found {
                Some(LAYOUT) => {}
                Some(1) => {
                    drop(meta);
                    self.upgrade_from_1(&tx)?;
                    let mut meta = tx.open_table(META).map_err(|e| self.failed(what, e))?;
                    meta.insert("layout", LAYOUT)
                        .map_err(|e| self.failed(what, e))?;
                }
                Some(other) => {
                    return Err(StoreError::Embedded(format!(
                        "{} holds layout {other}, this dedupd knows layout {LAYOUT}: it was \
                         written by another version; use that version, or a new path",
                        self.file.display()
                    )))
                }
                None => {
                    meta.insert("layout", LAYOUT)
                        .map_err(|e| self.failed(what, e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.failed(what, e))
    }

    /// Rewrites every table of done keys of layout 1 (expiry alone) with the values of this
    /// layout (no body digest), in the caller's write transaction: all or nothing.
    fn upgrade_from_1(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let what = "upgrading the file from layout 1";
        let started = std::time::Instant::now();
        let names: Vec<String> = tx
            .list_tables()
            .map_err(|e| self.failed(what, e))?
            .map(|t| t.name().to_owned())
            .filter(|name| is_done_table(name))
            .collect();
        let mut keys = 0;
        for name in &names {
            let entries: Vec<(Digest, u32)> = {
                let old = tx
                    .open_table(DoneTableV1::new(name))
                    .map_err(|e| self.failed(what, e))?;
                let all = old.iter().map_err(|e| self.failed(what, e))?;
                all.map(|entry| {
                    let (digest, expiry) = entry.map_err(|e| self.failed(what, e))?;
                    Ok((digest.value(), expiry.value()))
                })
                .collect::<Result<_, StoreError>>()?
            };
            tx.delete_table(DoneTableV1::new(name))
                .map_err(|e| self.failed(what, e))?;
            let mut new = tx
                .open_table(DoneTable::new(name))
                .map_err(|e| self.failed(what, e))?;
            for (digest, expiry) in &entries {
                new.insert(digest, (*expiry, 0))
                    .map_err(|e| self.failed(what, e))?;
            }
            keys += entries.len();
        }
        tracing::info!(file = %self.file.display(), tables = names.len(), keys, elapsed_ms = started.elapsed().as_millis() as u64, "embedded store upgraded from layout 1 (dedupd 0.4): keys kept, without body digests");
        Ok(())
    }

    /// A consistent view of the file as of now, for a batch of reads.
    pub fn reader(&self) -> Result<Reader<'_>, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.failed("starting a read", e))?;
        Ok(Reader {
            disk: self,
            txn,
            tables: HashMap::new(),
        })
    }

    /// Writes each `(route, digest, body)` done until `expiry`, in one write transaction made
    /// durable (fsync) before this returns. One disk sync, whatever the batch's size.
    pub fn write_done(&self, keys: &[(&str, Digest, u64)], expiry: u32) -> Result<(), StoreError> {
        self.update(keys, "writing done keys", true, |table, digest, &body| {
            table.insert(digest, (expiry, body)).map(drop)
        })
    }

    /// Moves each `(route, digest)` that is still done to `expiry` when that is later (a
    /// sliding window), keeping its body digest. Not synced by itself: the next commit's sync
    /// makes it durable, and a crash before that only loses the slide.
    pub fn slide(&self, keys: &[(&str, Digest)], expiry: u32) -> Result<(), StoreError> {
        let keys: Vec<(&str, Digest, ())> = keys.iter().map(|&(r, d)| (r, d, ())).collect();
        self.update(&keys, "sliding windows", false, |table, digest, ()| {
            let found = table.get(digest)?.map(|v| v.value());
            match found.filter(|&(old, _)| old < expiry) {
                Some((_, body)) => table.insert(digest, (expiry, body)).map(drop),
                None => Ok(()),
            }
        })
    }

    /// Applies `apply` to each `(route, digest, value)` in its route's table, in one write
    /// transaction, synced before this returns if `durable`.
    fn update<V>(
        &self,
        keys: &[(&str, Digest, V)],
        what: &str,
        durable: bool,
        mut apply: impl FnMut(
            &mut redb::Table<Digest, Entry>,
            &Digest,
            &V,
        ) -> Result<(), redb::StorageError>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(|e| self.failed(what, e))?;
        if !durable {
            tx.set_durability(Durability::None);
        }
        {
            let mut tables: HashMap<&str, redb::Table<Digest, Entry>> = HashMap::new();
            for (route, digest, value) in keys {
                if !tables.contains_key(route) {
                    let name = table_name(route);
                    let table = tx
                        .open_table(DoneTable::new(&name))
                        .map_err(|e| self.failed(what, e))?;
                    tables.insert(route, table);
                }
                if let Some(table) = tables.get_mut(route) {
                    apply(table, digest, value).map_err(|e| self.failed(what, e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.failed(what, e))
    }

    /// Deletes `digest` from `route`'s table, durably; its expiry if it was there.
    pub fn remove(&self, route: &str, digest: &Digest) -> Result<Option<u32>, StoreError> {
        let what = "deleting a key";
        let tx = self.db.begin_write().map_err(|e| self.failed(what, e))?;
        let name = table_name(route);
        let removed = {
            let mut table = tx
                .open_table(DoneTable::new(&name))
                .map_err(|e| self.failed(what, e))?;
            let removed = table.remove(digest).map_err(|e| self.failed(what, e))?;
            removed.map(|v| v.value().0)
        };
        tx.commit().map_err(|e| self.failed(what, e))?;
        Ok(removed)
    }

    /// The names of every table of done keys.
    pub fn done_tables(&self) -> Result<Vec<String>, StoreError> {
        let what = "listing tables";
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        let tables = tx.list_tables().map_err(|e| self.failed(what, e))?;
        Ok(tables
            .map(|t| t.name().to_owned())
            .filter(|name| is_done_table(name))
            .collect())
    }

    /// Reads up to [`SWEEP_CHUNK`] keys of `table` after `after`, and deletes those whose
    /// expiry is at or before `now_tick` (checked again in the write, so a key written done
    /// anew meanwhile stays). The write is durable only if `durable`: a lost deletion is
    /// done again by the next pass. Returns (keys deleted, where the next step starts:
    /// `None` at the end of the table, whether a write transaction ran).
    pub fn sweep_step(
        &self,
        table: &str,
        after: Option<Digest>,
        now_tick: u64,
        durable: bool,
    ) -> Result<SweepStep, StoreError> {
        let what = "sweeping expired keys";
        let definition = DoneTable::new(table);
        let (expired, next) = {
            let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
            let table = match tx.open_table(definition) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(SweepStep::default()),
                Err(e) => return Err(self.failed(what, e)),
            };
            let range = match &after {
                Some(after) => table.range::<&Digest>((Bound::Excluded(after), Bound::Unbounded)),
                None => table.range::<&Digest>(..),
            }
            .map_err(|e| self.failed(what, e))?;
            let mut expired = Vec::new();
            let (mut seen, mut last) = (0, None);
            for entry in range {
                let (digest, expiry) = entry.map_err(|e| self.failed(what, e))?;
                let digest = digest.value();
                if u64::from(expiry.value().0) <= now_tick {
                    expired.push(digest);
                }
                last = Some(digest);
                seen += 1;
                if seen == SWEEP_CHUNK {
                    break;
                }
            }
            (expired, if seen == SWEEP_CHUNK { last } else { None })
        };
        if expired.is_empty() {
            return Ok(SweepStep {
                removed: 0,
                next,
                wrote: false,
            });
        }
        let mut tx = self.db.begin_write().map_err(|e| self.failed(what, e))?;
        if !durable {
            tx.set_durability(Durability::None);
        }
        let mut removed = 0;
        {
            let mut table = tx
                .open_table(definition)
                .map_err(|e| self.failed(what, e))?;
            for digest in &expired {
                let still_expired = table
                    .get(digest)
                    .map_err(|e| self.failed(what, e))?
                    .is_some_and(|entry| u64::from(entry.value().0) <= now_tick);
                if still_expired {
                    table.remove(digest).map_err(|e| self.failed(what, e))?;
                    removed += 1;
                }
            }
        }
        tx.commit().map_err(|e| self.failed(what, e))?;
        Ok(SweepStep {
            removed,
            next,
            wrote: true,
        })
    }

    /// Keys in each of `routes`' tables (redb keeps each table's length: no scan), expired
    /// ones the sweeper has not removed yet included.
    pub fn counts(&self, routes: &[String]) -> Result<Vec<u64>, StoreError> {
        let what = "counting keys";
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        routes
            .iter()
            .map(|route| {
                let name = table_name(route);
                match tx.open_table(DoneTable::new(&name)) {
                    Ok(table) => table.len().map_err(|e| self.failed(what, e)),
                    Err(TableError::TableDoesNotExist(_)) => Ok(0),
                    Err(e) => Err(self.failed(what, e)),
                }
            })
            .collect()
    }

    /// Keys in every table of done keys, expired ones not yet swept included.
    pub fn total_keys(&self) -> Result<u64, StoreError> {
        let what = "counting keys";
        let tx = self.db.begin_read().map_err(|e| self.failed(what, e))?;
        let mut total = 0;
        for name in self.done_tables()? {
            let table = tx
                .open_table(DoneTable::new(&name))
                .map_err(|e| self.failed(what, e))?;
            total += table.len().map_err(|e| self.failed(what, e))?;
        }
        Ok(total)
    }

    /// Bytes the store's directory takes on disk: blocks allocated to its files (the file
    /// grows in whole regions and may be sparse, so its length would overstate it).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        dir_bytes(dir)
            .map_err(|e| StoreError::Embedded(format!("measuring {}: {e}", dir.display())))
    }
}

/// What one sweep step did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStep {
    /// Keys deleted.
    pub removed: u64,
    /// The last key read, where the next step starts; `None` at the end of the table.
    pub next: Option<Digest>,
    /// Whether a write transaction ran.
    pub wrote: bool,
}

/// Blocks allocated to the files directly in `dir`, in bytes.
pub fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            bytes += meta.blocks() * 512;
        }
    }
    Ok(bytes)
}

/// One read transaction, with the tables it opened.
pub struct Reader<'d> {
    disk: &'d Disk,
    txn: ReadTransaction,
    tables: HashMap<String, Option<ReadOnlyTable<Digest, Entry>>>,
}

impl Reader<'_> {
    /// The expiry of `digest` in `route`'s table, if it is there (expired or not).
    pub fn expiry(&mut self, route: &str, digest: &Digest) -> Result<Option<u32>, StoreError> {
        Ok(self.entry(route, digest)?.map(|(expiry, _)| expiry))
    }

    /// The expiry and body digest (0: none) of `digest` in `route`'s table, if it is there.
    pub fn entry(&mut self, route: &str, digest: &Digest) -> Result<Option<Entry>, StoreError> {
        let what = "reading a key";
        if !self.tables.contains_key(route) {
            let name = table_name(route);
            let table = match self.txn.open_table(DoneTable::new(&name)) {
                Ok(t) => Some(t),
                // Nothing was ever written done on this route.
                Err(TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(self.disk.failed(what, e)),
            };
            self.tables.insert(route.to_owned(), table);
        }
        match self.tables.get(route) {
            Some(Some(table)) => Ok(table
                .get(digest)
                .map_err(|e| self.disk.failed(what, e))?
                .map(|v| v.value())),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written by dedupd 0.4 (layout 1: digest → expiry) is upgraded at open: every key
    /// keeps its expiry, without a body digest, the file says layout 2, and opening it again
    /// changes nothing.
    #[test]
    fn a_layout_1_file_is_upgraded_in_place() {
        let dir =
            std::env::temp_dir().join(format!("dedupd-layout1-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join(FILE_NAME);
        let keys: Vec<(Digest, u32)> = (0u8..50).map(|n| ([n; 16], 1000 + u32::from(n))).collect();
        {
            let db = Database::builder()
                .create_with_file_format_v3(true)
                .create(&file)
                .expect("create a 0.4 file");
            let tx = db.begin_write().expect("write");
            {
                let mut meta = tx.open_table(META).expect("meta");
                meta.insert("layout", 1).expect("layout 1");
                let mut orders = tx
                    .open_table(DoneTableV1::new(&table_name("orders")))
                    .expect("orders");
                let mut none = tx
                    .open_table(DoneTableV1::new(&table_name("")))
                    .expect("no route");
                for (digest, expiry) in &keys {
                    orders.insert(digest, expiry).expect("insert");
                }
                none.insert(&[99; 16], 7).expect("insert");
            }
            tx.commit().expect("commit");
        }
        for _ in 0..2 {
            let disk = Disk::open(&file).unwrap_or_else(|_| panic!("open {}", file.display()));
            let mut reader = disk.reader().expect("reader");
            for (digest, expiry) in &keys {
                assert_eq!(
                    reader.entry("orders", digest).expect("read"),
                    Some((*expiry, 0))
                );
            }
            assert_eq!(reader.entry("", &[99; 16]).expect("read"), Some((7, 0)));
            assert_eq!(disk.counts(&["orders".to_owned()]).expect("counts"), [50]);
            let tx = disk.db.begin_read().expect("read");
            let meta = tx.open_table(META).expect("meta");
            assert_eq!(
                meta.get("layout").expect("get").map(|v| v.value()),
                Some(LAYOUT)
            );
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A slide moves a done key's expiry later, never earlier, keeps its body digest, and
    /// leaves a key that is not there absent.
    #[test]
    fn slide_only_extends_and_keeps_the_digest() {
        let dir = std::env::temp_dir().join(format!("dedupd-slide-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let disk = Disk::open(&dir.join(FILE_NAME)).unwrap_or_else(|_| panic!("open"));
        disk.write_done(&[("r", [1; 16], 42), ("r", [2; 16], 0)], 100)
            .expect("write");
        disk.slide(&[("r", [1; 16]), ("r", [3; 16])], 200)
            .expect("slide");
        disk.slide(&[("r", [2; 16])], 50).expect("slide back");
        let mut reader = disk.reader().expect("reader");
        assert_eq!(reader.entry("r", &[1; 16]).expect("read"), Some((200, 42)));
        assert_eq!(reader.entry("r", &[2; 16]).expect("read"), Some((100, 0)));
        assert_eq!(reader.entry("r", &[3; 16]).expect("read"), None);
        drop(reader);
        drop(disk);
        let _ = std::fs::remove_dir_all(dir);
    }
}
