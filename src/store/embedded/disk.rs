//! The embedded store's file: done keys in redb tables, one per route (the parent module says
//! why this layout and what it costs). Everything here blocks on the disk: call it from
//! `spawn_blocking` only.
//!
//! | table | key | value |
//! |---|---|---|
//! | `done:{route}` | 16-byte digest of the store key | expiry, in ticks of `layout::TICK_MS` since `layout::EPOCH_MS` (u32) |
//! | `done` | the same, for keys of no route (not `{prefix}:{route}:{id}`) | the same |
//! | `meta` | `layout` | [`LAYOUT`] |
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
pub const LAYOUT: u64 = 1;

/// The file in the store's directory.
pub const FILE_NAME: &str = "dedupd.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NO_ROUTE: &str = "done";
const ROUTE_PREFIX: &str = "done:";

/// Keys a sweep step reads at most: about a millisecond of reading, so a commit never waits
/// long behind the sweeper's write.
pub const SWEEP_CHUNK: usize = 4096;

type DoneTable<'a> = TableDefinition<'a, Digest, u32>;

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

    /// Writes each `(route, digest)` done until `expiry`, in one write transaction made
    /// durable (fsync) before this returns. One disk sync, whatever the batch's size.
    pub fn write_done(&self, keys: &[(&str, Digest)], expiry: u32) -> Result<(), StoreError> {
        let what = "writing done keys";
        let tx = self.db.begin_write().map_err(|e| self.failed(what, e))?;
        {
            let mut tables: HashMap<&str, redb::Table<Digest, u32>> = HashMap::new();
            for (route, digest) in keys {
                if !tables.contains_key(route) {
                    let name = table_name(route);
                    let table = tx
                        .open_table(DoneTable::new(&name))
                        .map_err(|e| self.failed(what, e))?;
                    tables.insert(route, table);
                }
                if let Some(table) = tables.get_mut(route) {
                    table
                        .insert(digest, expiry)
                        .map_err(|e| self.failed(what, e))?;
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
            removed.map(|v| v.value())
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
                if u64::from(expiry.value()) <= now_tick {
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
                    .is_some_and(|expiry| u64::from(expiry.value()) <= now_tick);
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
    tables: HashMap<String, Option<ReadOnlyTable<Digest, u32>>>,
}

impl Reader<'_> {
    /// The expiry of `digest` in `route`'s table, if it is there (expired or not).
    pub fn expiry(&mut self, route: &str, digest: &Digest) -> Result<Option<u32>, StoreError> {
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
