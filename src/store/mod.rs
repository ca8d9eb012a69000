//! Durable item store: one SQLite database (`crossbatch.db`) in the data directory.
//!
//! The store is the source of truth; the vector index is a cache derived from it and rebuilt
//! at start-up with [`Store::for_each_embedding`]. The database runs in WAL mode with
//! `synchronous=FULL`, so every write method is durable when it returns: a `kill -9` right
//! after cannot lose it.
//!
//! Every item write (upsert, delete, embedding replacement) takes the next value of one global,
//! monotonically increasing sequence number that is stored in the database and so survives
//! restarts.
//!
//! [`Store`] wraps a single connection behind a [`Mutex`]; call it from blocking threads only
//! (e.g. `tokio::task::spawn_blocking`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

mod classes;

pub use classes::{ClassDeletion, ClassExample, ClassRecord, ClassRegistration};

/// File name of the database inside the data directory.
pub const DB_FILE_NAME: &str = "crossbatch.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    id            TEXT PRIMARY KEY NOT NULL,
    label         TEXT,
    metadata      TEXT NOT NULL,
    input         BLOB NOT NULL,
    input_kind    TEXT NOT NULL,
    embedding     BLOB NOT NULL,
    model_version INTEGER NOT NULL,
    seq           INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_label ON items(label) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sequence (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO sequence (id, value) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS classes (
    label               TEXT PRIMARY KEY NOT NULL,
    created_unix        INTEGER NOT NULL,
    expected_generation INTEGER,
    first_generation    INTEGER
);
CREATE TABLE IF NOT EXISTS class_examples (
    id         TEXT PRIMARY KEY NOT NULL,
    label      TEXT NOT NULL,
    input      BLOB NOT NULL,
    input_kind TEXT NOT NULL,
    seq        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS class_examples_label ON class_examples(label);
CREATE TABLE IF NOT EXISTS generations (
    version      INTEGER PRIMARY KEY NOT NULL,
    model_dir    TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    details      TEXT NOT NULL
);
";

/// Errors returned by [`Store`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Io {
        /// The directory that could not be created.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An SQLite error (I/O, constraint, corruption, ...).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A (de)serialisation error for metadata or the input kind.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// An item given to a write method is invalid; nothing of that call was written.
    #[error("invalid item {id:?}: {reason}")]
    InvalidItem {
        /// The offending item id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The id is taken by the other kind of example (items and training-only class examples
    /// share one id space); nothing of that call was written.
    #[error("id {id:?} is already taken by {owner}")]
    IdTaken {
        /// The id.
        id: String,
        /// What holds it: "an item" or "a training-only class example".
        owner: &'static str,
    },
    /// A stored row could not be decoded.
    #[error("corrupt row {id:?}: {reason}")]
    Corrupt {
        /// The id of the row.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database was opened in a journal mode other than WAL.
    #[error("could not enable WAL journal mode (got {0:?})")]
    JournalMode(String),
}

/// What the raw `input` bytes of an item are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputKind {
    /// An encoded image (PNG or JPEG bytes).
    Image,
    /// A tensor of `f32`, little-endian, row-major, with this shape.
    Tensor {
        /// Dimensions of the tensor.
        shape: Vec<usize>,
    },
}

/// An item to insert or replace with [`Store::upsert_items`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    /// Caller-chosen unique id; an existing item with this id is replaced.
    pub id: String,
    /// Optional class label (used for filtering and training).
    pub label: Option<String>,
    /// Arbitrary JSON metadata returned with search results.
    pub metadata: serde_json::Value,
    /// Raw input bytes (see [`InputKind`]), kept so items can be re-embedded.
    pub input: Vec<u8>,
    /// How to interpret `input`.
    pub input_kind: InputKind,
    /// The embedding of `input` under model `model_version` (non-empty, finite).
    pub embedding: Vec<f32>,
    /// Version of the model that produced `embedding`.
    pub model_version: u64,
}

/// An item as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    /// Unique id.
    pub id: String,
    /// Optional class label.
    pub label: Option<String>,
    /// JSON metadata.
    pub metadata: serde_json::Value,
    /// Raw input bytes.
    pub input: Vec<u8>,
    /// How to interpret `input`.
    pub input_kind: InputKind,
    /// Current embedding.
    pub embedding: Vec<f32>,
    /// Version of the model that produced `embedding`.
    pub model_version: u64,
    /// Sequence number of the last write to this item.
    pub seq: u64,
}

/// One live item's embedding, as yielded by [`Store::for_each_embedding`].
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRow {
    /// Item id.
    pub id: String,
    /// Optional class label.
    pub label: Option<String>,
    /// Current embedding.
    pub embedding: Vec<f32>,
    /// Version of the model that produced `embedding`.
    pub model_version: u64,
    /// Sequence number of the last write to this item.
    pub seq: u64,
}

/// One stored input, as [`Store::inputs_of`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRow {
    /// Item id.
    pub id: String,
    /// Optional class label.
    pub label: Option<String>,
    /// Raw input bytes.
    pub input: Vec<u8>,
    /// How to interpret `input`.
    pub input_kind: InputKind,
    /// Sequence number of the last write to this item.
    pub seq: u64,
}

/// A labelled item as the trainer's sampler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledExample {
    /// Item id.
    pub id: String,
    /// Class label.
    pub label: String,
    /// Sequence number of the last write (changes when the item is replaced).
    pub seq: u64,
}

/// An embedding computed for an item as it was at sequence number `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRefresh {
    /// Item id.
    pub id: String,
    /// The item's sequence number when its input was read.
    pub seq: u64,
    /// New embedding.
    pub embedding: Vec<f32>,
    /// Version of the model that produced it.
    pub model_version: u64,
}

/// A published model generation, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// Model version.
    pub version: u64,
    /// Directory of the generation's model (model.toml + weights).
    pub model_dir: PathBuf,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Free-form details: training metrics, drift, origin.
    pub details: serde_json::Value,
}

/// The durable item store (see the module documentation).
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The data directory, canonical: generation directories inside it are recorded relative
    /// to it, so the whole directory can be moved.
    data_dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn embedding_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_embedding(id: &str, bytes: &[u8]) -> Result<Vec<f32>, StoreError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(StoreError::Corrupt {
            id: id.to_owned(),
            reason: format!("embedding blob of {} bytes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn to_i64(id: &str, what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidItem {
        id: id.to_owned(),
        reason: format!("{what} {v} exceeds i64::MAX"),
    })
}

fn to_u64(id: &str, what: &str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        reason: format!("negative {what} {v}"),
    })
}

fn validate_embedding(id: &str, embedding: &[f32]) -> Result<(), StoreError> {
    if embedding.is_empty() {
        return Err(StoreError::InvalidItem {
            id: id.to_owned(),
            reason: "empty embedding".into(),
        });
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::InvalidItem {
            id: id.to_owned(),
            reason: "non-finite value in embedding".into(),
        });
    }
    Ok(())
}

fn validate_item(item: &NewItem) -> Result<(), StoreError> {
    if item.id.is_empty() {
        return Err(StoreError::InvalidItem {
            id: String::new(),
            reason: "empty id".into(),
        });
    }
    validate_embedding(&item.id, &item.embedding)
}

/// Reads the current sequence value inside a transaction / connection.
fn read_seq(conn: &Connection) -> Result<u64, StoreError> {
    let v: i64 = conn.query_row("SELECT value FROM sequence WHERE id = 0", [], |r| r.get(0))?;
    to_u64("<sequence>", "sequence", v)
}

fn write_seq(conn: &Connection, seq: u64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE sequence SET value = ?1 WHERE id = 0",
        params![to_i64("<sequence>", "sequence", seq)?],
    )?;
    Ok(())
}

fn input_row(r: &rusqlite::Row<'_>) -> Result<InputRow, StoreError> {
    let kind: String = r.get(3)?;
    let id: String = r.get(0)?;
    let seq = to_u64(&id, "sequence", r.get(4)?)?;
    Ok(InputRow {
        id,
        label: r.get(1)?,
        input: r.get(2)?,
        input_kind: serde_json::from_str(&kind)?,
        seq,
    })
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`: creates the directory and
    /// `crossbatch.db`, enables WAL with `synchronous=FULL` and creates the schema.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::JournalMode(mode));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        let data_dir = std::fs::canonicalize(data_dir).map_err(|source| StoreError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let store = Store {
            conn: Mutex::new(conn),
            path,
            data_dir,
        };
        store.migrate_generation_dirs()?;
        Ok(store)
    }

    /// Rewrites relative generation directories into the current form (relative to the data
    /// directory, without `..`). A row is read relative to the data directory when it exists
    /// there, else as earlier versions wrote it: relative to the working directory
    /// (`./data/generations/N`). Rows found in neither place are left as they are.
    fn migrate_generation_dirs(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let rows: Vec<(i64, String)> = conn
            .prepare("SELECT version, model_dir FROM generations")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (version, recorded) in rows {
            let recorded = PathBuf::from(recorded);
            if recorded.is_absolute() {
                continue;
            }
            let found = std::fs::canonicalize(self.data_dir.join(&recorded))
                .or_else(|_| std::fs::canonicalize(&recorded));
            if let Ok(found) = found {
                let normalised = self.stored_model_dir(&found);
                if normalised != recorded {
                    conn.execute(
                        "UPDATE generations SET model_dir = ?1 WHERE version = ?2",
                        params![normalised.to_string_lossy(), version],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Locks the connection. A poisoned lock is recovered: any transaction that was open when
    /// the panic happened was rolled back when it was dropped.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or replaces `items` in one transaction; each item takes the next sequence
    /// number. Returns the last sequence number (the current one when `items` is empty).
    /// On error nothing of the batch is written.
    pub fn upsert_items(&self, items: &[NewItem]) -> Result<u64, StoreError> {
        self.upsert_items_registering(items, None)
    }

    /// [`Store::upsert_items`], registering `class` in the same transaction: the items and
    /// the class are stored together or not at all.
    pub fn upsert_items_registering(
        &self,
        items: &[NewItem],
        class: Option<&ClassRegistration>,
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        if items.is_empty() && class.is_none() {
            return read_seq(&conn);
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq = read_seq(&tx)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO items
                 (id, label, metadata, input, input_kind, embedding, model_version, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for item in items {
                validate_item(item)?;
                classes::check_id_free(&tx, classes::ExampleTable::ClassExamples, &item.id)?;
                seq += 1;
                stmt.execute(params![
                    item.id,
                    item.label,
                    serde_json::to_string(&item.metadata)?,
                    item.input,
                    serde_json::to_string(&item.input_kind)?,
                    embedding_to_bytes(&item.embedding),
                    to_i64(&item.id, "model_version", item.model_version)?,
                    to_i64(&item.id, "sequence", seq)?,
                ])?;
            }
        }
        if let Some(class) = class {
            classes::register_class(&tx, class)?;
        }
        write_seq(&tx, seq)?;
        tx.commit()?;
        Ok(seq)
    }

    /// Returns the item with this id, if any.
    pub fn get_item(&self, id: &str) -> Result<Option<StoredItem>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT label, metadata, input, input_kind, embedding, model_version, seq
             FROM items WHERE id = ?1",
        )?;
        type Raw = (Option<String>, String, Vec<u8>, String, Vec<u8>, i64, i64);
        let raw: Option<Raw> = stmt
            .query_row(params![id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()?;
        let Some((label, metadata, input, kind, emb, version, seq)) = raw else {
            return Ok(None);
        };
        Ok(Some(StoredItem {
            id: id.to_owned(),
            label,
            metadata: serde_json::from_str(&metadata)?,
            input,
            input_kind: serde_json::from_str(&kind)?,
            embedding: bytes_to_embedding(id, &emb)?,
            model_version: to_u64(id, "model_version", version)?,
            seq: to_u64(id, "sequence", seq)?,
        }))
    }

    /// Deletes the item; returns `true` when it existed (and then consumes a sequence number).
    pub fn delete_item(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute("DELETE FROM items WHERE id = ?1", params![id])?;
        if n == 0 {
            return Ok(false);
        }
        let seq = read_seq(&tx)? + 1;
        write_seq(&tx, seq)?;
        tx.commit()?;
        Ok(true)
    }

    /// Number of live items.
    pub fn item_count(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM items", [], |r| r.get(0))?;
        to_u64("<count>", "count", n)
    }

    /// The last sequence number handed out (0 for a fresh store; for tests).
    #[cfg(test)]
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        read_seq(&self.conn())
    }

    /// Streams `(id, label, embedding, model_version, seq)` of every live item, ordered by id,
    /// without loading input bytes. Runs on one consistent snapshot and holds the store lock
    /// throughout: `f` must not call back into this `Store` (it would deadlock).
    /// Stops at the first error returned by `f`.
    pub fn for_each_embedding<E, F>(&self, mut f: F) -> Result<(), E>
    where
        F: FnMut(EmbeddingRow) -> Result<(), E>,
        E: From<StoreError>,
    {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(StoreError::from)?;
        let mut stmt = tx
            .prepare("SELECT id, label, embedding, model_version, seq FROM items ORDER BY id")
            .map_err(StoreError::from)?;
        let mut rows = stmt.query([]).map_err(StoreError::from)?;
        while let Some(r) = rows.next().map_err(StoreError::from)? {
            let row = (|| -> Result<EmbeddingRow, StoreError> {
                let id: String = r.get(0)?;
                let emb: Vec<u8> = r.get(2)?;
                let version: i64 = r.get(3)?;
                let seq: i64 = r.get(4)?;
                Ok(EmbeddingRow {
                    embedding: bytes_to_embedding(&id, &emb)?,
                    label: r.get(1)?,
                    model_version: to_u64(&id, "model_version", version)?,
                    seq: to_u64(&id, "sequence", seq)?,
                    id,
                })
            })()?;
            f(row)?;
        }
        Ok(())
    }

    /// The ids of every live item, ordered. A caller that needs their inputs reads them in
    /// chunks with [`Store::inputs_of`], so that neither all inputs nor the store's lock are
    /// held at once.
    pub fn item_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT id FROM items ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Label and metadata of each of `ids` that exists (missing ids are simply absent from
    /// the map). Used to join search hits.
    pub fn labels_and_metadata(
        &self,
        ids: &[String],
    ) -> Result<HashMap<String, (Option<String>, serde_json::Value)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT label, metadata FROM items WHERE id = ?1")?;
        let mut out = HashMap::with_capacity(ids.len());
        for id in ids {
            if out.contains_key(id) {
                continue;
            }
            let row: Option<(Option<String>, String)> = stmt
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((label, metadata)) = row {
                out.insert(id.clone(), (label, serde_json::from_str(&metadata)?));
            }
        }
        Ok(out)
    }

    /// Every labelled example with its sequence number, ordered by id (for the trainer's
    /// sampler): labelled items and the non-searchable examples of uploaded classes.
    pub fn labelled_examples(&self) -> Result<Vec<LabelledExample>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, label, seq FROM items WHERE label IS NOT NULL
             UNION ALL SELECT id, label, seq FROM class_examples ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?)))?;
        rows.map(|row| {
            let (id, label, seq): (String, String, i64) = row?;
            let seq = to_u64(&id, "sequence", seq)?;
            Ok(LabelledExample { id, label, seq })
        })
        .collect()
    }

    /// The inputs of those of `ids` that exist (items or class examples), in the order given.
    pub fn inputs_of(&self, ids: &[String]) -> Result<Vec<InputRow>, StoreError> {
        let conn = self.conn();
        let mut items = conn
            .prepare_cached("SELECT id, label, input, input_kind, seq FROM items WHERE id = ?1")?;
        let mut examples = conn.prepare_cached(
            "SELECT id, label, input, input_kind, seq FROM class_examples WHERE id = ?1",
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = match items
                .query_row(params![id], |r| Ok(input_row(r)))
                .optional()?
            {
                Some(row) => Some(row),
                None => examples
                    .query_row(params![id], |r| Ok(input_row(r)))
                    .optional()?,
            };
            if let Some(row) = row {
                out.push(row?);
            }
        }
        Ok(out)
    }

    /// Replaces embeddings computed by a newer model, in one transaction. A row is written
    /// only if its item still has the sequence number it was read at, so a refresh never
    /// overwrites a newer write; refreshes take no sequence number (the item did not change).
    /// Returns how many rows were written. On error nothing is written.
    pub fn refresh_embeddings(&self, rows: &[EmbeddingRefresh]) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut updated = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE items SET embedding = ?3, model_version = ?4 WHERE id = ?1 AND seq = ?2",
            )?;
            for row in rows {
                validate_embedding(&row.id, &row.embedding)?;
                updated += stmt.execute(params![
                    row.id,
                    to_i64(&row.id, "sequence", row.seq)?,
                    embedding_to_bytes(&row.embedding),
                    to_i64(&row.id, "model_version", row.model_version)?,
                ])?;
            }
        }
        tx.commit()?;
        Ok(updated)
    }

    /// Durably records (or replaces) a published generation.
    pub fn record_generation(&self, record: &GenerationRecord) -> Result<(), StoreError> {
        let conn = self.conn();
        let version = to_i64("<generation>", "version", record.version)?;
        let created = to_i64("<generation>", "created_unix", record.created_unix)?;
        conn.execute(
            "INSERT INTO generations (version, model_dir, created_unix, details) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(version) DO UPDATE SET model_dir = excluded.model_dir,
                 created_unix = excluded.created_unix, details = excluded.details",
            params![
                version,
                self.stored_model_dir(&record.model_dir).to_string_lossy(),
                created,
                serde_json::to_string(&record.details)?
            ],
        )?;
        Ok(())
    }

    /// How a generation's directory is recorded: relative to the data directory when inside
    /// it, else absolute (a base model elsewhere).
    fn stored_model_dir(&self, dir: &Path) -> PathBuf {
        // A directory that is not there (yet) is made absolute without resolving links.
        let dir = std::fs::canonicalize(dir)
            .or_else(|_| std::path::absolute(dir))
            .unwrap_or_else(|_| dir.to_owned());
        match dir.strip_prefix(&self.data_dir) {
            Ok(inside) => inside.to_owned(),
            Err(_) => dir,
        }
    }

    /// Forgets generation `version` (its directory is the caller's); returns whether it was
    /// recorded.
    pub fn delete_generation(&self, version: u64) -> Result<bool, StoreError> {
        let version = to_i64("<generation>", "version", version)?;
        let deleted = self.conn().execute(
            "DELETE FROM generations WHERE version = ?1",
            params![version],
        )?;
        Ok(deleted > 0)
    }

    /// Every recorded generation, oldest first.
    pub fn generations(&self) -> Result<Vec<GenerationRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT version, model_dir, created_unix, details FROM generations ORDER BY version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        rows.map(|row| {
            let (version, dir, created, details) = row?;
            Ok(GenerationRecord {
                version: to_u64("<generation>", "version", version)?,
                model_dir: self.data_dir.join(dir),
                created_unix: to_u64("<generation>", "created_unix", created)?,
                details: serde_json::from_str(&details)?,
            })
        })
        .collect()
    }

    /// Reads a value from the key/value `meta` table.
    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Durably sets a value in the key/value `meta` table (does not consume a sequence number).
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(id: &str, label: Option<&str>, emb: Vec<f32>) -> NewItem {
        NewItem {
            id: id.into(),
            label: label.map(Into::into),
            metadata: json!({ "id": id, "n": emb.len() }),
            input: id.as_bytes().to_vec(),
            input_kind: InputKind::Tensor {
                shape: vec![1, id.len()],
            },
            embedding: emb,
            model_version: 1,
        }
    }

    fn all_embeddings(store: &Store) -> Vec<EmbeddingRow> {
        let mut out = Vec::new();
        store
            .for_each_embedding(|r| {
                out.push(r);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        out
    }

    #[test]
    fn upsert_get_replace_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_seq().unwrap(), 0);
        assert_eq!(store.get_item("a").unwrap(), None);

        let mut a = item("a", Some("cat"), vec![0.5, -1.25, 3.0]);
        a.input_kind = InputKind::Image;
        let b = item("b", None, vec![1.0, 2.0, 3.0]);
        assert_eq!(store.upsert_items(&[a.clone(), b.clone()]).unwrap(), 2);
        assert_eq!(store.item_count().unwrap(), 2);

        let got = store.get_item("a").unwrap().unwrap();
        assert_eq!(got.id, "a");
        assert_eq!(got.label.as_deref(), Some("cat"));
        assert_eq!(got.metadata, a.metadata);
        assert_eq!(got.input, a.input);
        assert_eq!(got.input_kind, InputKind::Image);
        assert_eq!(got.embedding, a.embedding);
        assert_eq!(got.model_version, 1);
        assert_eq!(got.seq, 1);
        let got_b = store.get_item("b").unwrap().unwrap();
        assert_eq!(got_b.input_kind, b.input_kind);
        assert_eq!(got_b.seq, 2);

        // Replace "a": new content, new seq, count unchanged.
        let mut a2 = item("a", Some("dog"), vec![9.0, 8.0]);
        a2.model_version = 7;
        a2.metadata = json!({"replaced": true});
        assert_eq!(store.upsert_items(&[a2.clone()]).unwrap(), 3);
        assert_eq!(store.item_count().unwrap(), 2);
        let got = store.get_item("a").unwrap().unwrap();
        assert_eq!(got.label.as_deref(), Some("dog"));
        assert_eq!(got.embedding, vec![9.0, 8.0]);
        assert_eq!(got.model_version, 7);
        assert_eq!(got.metadata, json!({"replaced": true}));
        assert_eq!(got.seq, 3);

        assert!(store.delete_item("a").unwrap());
        assert_eq!(store.last_seq().unwrap(), 4);
        assert!(!store.delete_item("a").unwrap());
        assert_eq!(store.last_seq().unwrap(), 4, "no-op delete takes no seq");
        assert_eq!(store.get_item("a").unwrap(), None);
        assert_eq!(store.item_count().unwrap(), 1);
        assert_eq!(store.upsert_items(&[]).unwrap(), 4);
    }

    #[test]
    fn seq_is_monotonic_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for round in 0..3u64 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.last_seq().unwrap(), last, "seq survives reopen");
            let id = format!("item{round}");
            let s = store
                .upsert_items(&[item(&id, Some("x"), vec![round as f32 + 1.0])])
                .unwrap();
            assert!(s > last);
            last = s;
            store.upsert_items(&[item("tmp", None, vec![1.0])]).unwrap();
            assert!(store.delete_item("tmp").unwrap());
            assert_eq!(store.last_seq().unwrap(), last + 2);
            last += 2;
            let seq = store.get_item(&id).unwrap().unwrap().seq;
            let refresh = |id: &str, seq: u64| EmbeddingRefresh {
                id: id.into(),
                seq,
                embedding: vec![42.0],
                model_version: 2,
            };
            let n = store
                .refresh_embeddings(&[
                    refresh(&id, seq),
                    refresh("missing", seq),
                    refresh(&id, seq - 1),
                ])
                .unwrap();
            assert_eq!(
                n, 1,
                "only the existing item at its current seq is refreshed"
            );
            assert_eq!(store.last_seq().unwrap(), last, "a refresh takes no seq");
            let got = store.get_item(&id).unwrap().unwrap();
            assert_eq!(got.seq, seq);
            assert_eq!(got.embedding, vec![42.0]);
            assert_eq!(got.model_version, 2);
            store.set_meta("round", &round.to_string()).unwrap();
            drop(store);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.last_seq().unwrap(), last);
        assert_eq!(store.get_meta("round").unwrap().as_deref(), Some("2"));
        assert_eq!(store.get_meta("nope").unwrap(), None);
        let ids: Vec<String> = all_embeddings(&store).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec!["item0", "item1", "item2"]);
        let got = store.get_item("item1").unwrap().unwrap();
        assert_eq!(got.label.as_deref(), Some("x"));
        assert_eq!(got.metadata, json!({"id": "item1", "n": 1}));
        assert_eq!(got.embedding, vec![42.0]);
    }

    #[test]
    fn failed_batch_leaves_store_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .upsert_items(&[item("keep", Some("a"), vec![1.0, 2.0])])
            .unwrap();
        let before_seq = store.last_seq().unwrap();
        // First item is valid (and replaces an existing one), second is invalid: the whole
        // transaction must roll back.
        let bad = vec![
            item("keep", Some("changed"), vec![5.0, 5.0]),
            item("new", None, vec![1.0]),
            item("nan", None, vec![f32::NAN]),
        ];
        let err = store.upsert_items(&bad).unwrap_err();
        assert!(matches!(err, StoreError::InvalidItem { ref id, .. } if id == "nan"));
        let empty = vec![item("x", None, vec![1.0]), item("y", None, vec![])];
        assert!(store.upsert_items(&empty).is_err());
        let seq = store.get_item("keep").unwrap().unwrap().seq;
        let bad_emb: Vec<EmbeddingRefresh> = [vec![3.0], vec![f32::INFINITY]]
            .into_iter()
            .map(|embedding| EmbeddingRefresh {
                id: "keep".into(),
                seq,
                embedding,
                model_version: 9,
            })
            .collect();
        assert!(store.refresh_embeddings(&bad_emb).is_err());

        assert_eq!(store.last_seq().unwrap(), before_seq);
        assert_eq!(store.item_count().unwrap(), 1);
        let got = store.get_item("keep").unwrap().unwrap();
        assert_eq!(got.label.as_deref(), Some("a"));
        assert_eq!(got.embedding, vec![1.0, 2.0]);
        assert_eq!(got.model_version, 1);
        assert_eq!(store.get_item("new").unwrap(), None);
        // The store still works after the failures.
        assert_eq!(
            store.upsert_items(&[item("new", None, vec![1.0])]).unwrap(),
            before_seq + 1
        );
    }

    #[test]
    fn labels_metadata_and_examples() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .upsert_items(&[
                item("b", Some("dog"), vec![1.0]),
                item("a", Some("cat"), vec![1.0]),
                item("c", None, vec![1.0]),
            ])
            .unwrap();
        let ids: Vec<String> = ["a", "c", "zzz", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let m = store.labels_and_metadata(&ids).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["a"], (Some("cat".into()), json!({"id": "a", "n": 1})));
        assert_eq!(m["c"], (None, json!({"id": "c", "n": 1})));
        let examples: Vec<(String, String)> = store
            .labelled_examples()
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.label))
            .collect();
        assert_eq!(
            examples,
            vec![("a".into(), "cat".into()), ("b".into(), "dog".into())]
        );
        let inputs = store
            .inputs_of(&["c".into(), "nope".into(), "a".into()])
            .unwrap();
        let ids: Vec<&str> = inputs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, vec!["c", "a"]);
        let ids = store.item_ids().unwrap();
        assert_eq!(ids, ["a", "b", "c"]);
        let inputs = store.inputs_of(&ids).unwrap();
        assert_eq!(inputs.len(), 3);
        assert_eq!(inputs[1].id, "b");
        assert_eq!(inputs[1].input, b"b".to_vec());
        assert_eq!(inputs[1].label.as_deref(), Some("dog"));
        assert_eq!(
            inputs[1].input_kind,
            InputKind::Tensor { shape: vec![1, 1] }
        );
    }

    #[test]
    fn for_each_embedding_sees_exactly_live_items() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for i in 0..50u32 {
            let emb = vec![i as f32, -(i as f32), 0.5];
            store
                .upsert_items(&[item(&format!("{i:03}"), Some("l"), emb.clone())])
                .unwrap();
            expected.insert(format!("{i:03}"), emb);
        }
        for i in (0..50u32).step_by(3) {
            assert!(store.delete_item(&format!("{i:03}")).unwrap());
            expected.remove(&format!("{i:03}"));
        }
        store
            .upsert_items(&[item("007", None, vec![7.0, 7.0, 7.0])])
            .unwrap();
        expected.insert("007".into(), vec![7.0, 7.0, 7.0]);

        let rows = all_embeddings(&store);
        let got: std::collections::BTreeMap<String, Vec<f32>> = rows
            .iter()
            .map(|r| (r.id.clone(), r.embedding.clone()))
            .collect();
        assert_eq!(rows.len(), got.len(), "no duplicates");
        assert_eq!(got, expected);
        assert_eq!(store.item_count().unwrap(), expected.len() as u64);
        let r7 = rows.iter().find(|r| r.id == "007").unwrap();
        assert_eq!(r7.label, None);
        assert_eq!(r7.seq, store.last_seq().unwrap());

        // Errors from the callback stop the iteration and are returned.
        let mut seen = 0;
        let res: Result<(), StoreError> = store.for_each_embedding(|_| {
            seen += 1;
            if seen == 3 {
                Err(StoreError::JournalMode("stop".into()))
            } else {
                Ok(())
            }
        });
        assert!(res.is_err());
        assert_eq!(seen, 3);
        // And the store is still usable afterwards.
        assert_eq!(store.item_count().unwrap(), expected.len() as u64);
    }

    #[test]
    fn wal_and_full_sync_are_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn generations_inside_the_data_dir_follow_it_when_it_moves() {
        let parent = tempfile::tempdir().unwrap();
        let before = parent.path().join("before");
        // The legacy row below must not also resolve from the data directory, which it does
        // when both sit at the same depth: nest the data directory one level deeper then.
        let depth = |p: &Path| p.components().count();
        let mut after = parent.path().join("after");
        if depth(&after) == depth(&std::env::current_dir().unwrap()) {
            after = parent.path().join("moved").join("after");
        }
        let elsewhere = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&before).unwrap();
            std::fs::create_dir_all(before.join("generations/2")).unwrap();
            for (version, model_dir) in [
                (2, before.join("generations/2")),
                (1, elsewhere.path().to_owned()),
            ] {
                store
                    .record_generation(&GenerationRecord {
                        version,
                        model_dir,
                        created_unix: 0,
                        details: json!({}),
                    })
                    .unwrap();
            }
        }
        std::fs::create_dir_all(after.parent().unwrap()).unwrap();
        std::fs::rename(&before, &after).unwrap();
        // A row as earlier versions wrote it: relative to the working directory.
        // And one relative to the data directory but not in normal form.
        let legacy_rows = [
            (3, relative_to_cwd(&after.join("generations/3"))),
            (4, PathBuf::from("../after/generations/./4")),
        ];
        {
            let conn = Connection::open(after.join(DB_FILE_NAME)).unwrap();
            for (version, recorded) in &legacy_rows {
                std::fs::create_dir_all(after.join(format!("generations/{version}"))).unwrap();
                conn.execute(
                    "INSERT INTO generations (version, model_dir, created_unix, details) VALUES (?1, ?2, 0, '{}')",
                    params![version, recorded.to_string_lossy()],
                )
                .unwrap();
            }
        }
        let store = Store::open(&after).unwrap();
        let dirs: Vec<PathBuf> = store
            .generations()
            .unwrap()
            .into_iter()
            .map(|g| g.model_dir)
            .collect();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            dirs,
            [
                canonical(elsewhere.path()),
                canonical(&after).join("generations/2"),
                canonical(&after).join("generations/3"),
                canonical(&after).join("generations/4"),
            ]
        );
    }

    /// `path` relative to the working directory (`../..` up to the root, then down).
    fn relative_to_cwd(path: &Path) -> PathBuf {
        let cwd = std::env::current_dir().unwrap();
        let up = cwd.components().count() - 1;
        let mut relative: PathBuf = (0..up).map(|_| "..").collect();
        relative.push(path.strip_prefix("/").unwrap());
        relative
    }

    #[test]
    fn generations_are_recorded_durably() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = std::fs::canonicalize(dir.path()).unwrap();
        let record = |version: u64| GenerationRecord {
            version,
            model_dir: data_dir.join(format!("generations/{version}")),
            created_unix: 1_700_000_000 + version,
            details: json!({ "steps": version * 100 }),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(store.generations().unwrap().is_empty());
            store.record_generation(&record(2)).unwrap();
            store.record_generation(&record(1)).unwrap();
            let mut replaced = record(2);
            replaced.details = json!({ "steps": 7 });
            store.record_generation(&replaced).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.generations().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], record(1));
        assert_eq!(all[1].details, json!({ "steps": 7 }));
    }
}
