//! Uploaded classes: their registration (when they arrived, which generation is expected to
//! include them and which first did) and the examples stored for training only (not indexed).
//!
//! A class registered here and not yet included in a generation is *pending*: the online
//! trainer focuses on it until it publishes a generation that has learnt it. Because the
//! registration is in the database, that focus survives a restart.
use std::collections::HashSet;

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{read_seq, to_i64, to_u64, write_seq, InputKind, Store, StoreError};

/// The registration of an uploaded class, written in the same transaction as its examples.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRegistration {
    /// The label.
    pub label: String,
    /// The generation expected to include it (`None` without a trainer).
    pub expected_generation: Option<u64>,
    /// Upload time, seconds since the Unix epoch.
    pub now_unix: u64,
}

/// An example of an uploaded class kept for training but not searchable.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassExample {
    /// Unique id (shares the id space of items).
    pub id: String,
    /// Raw input bytes (see [`InputKind`]).
    pub input: Vec<u8>,
    /// How to interpret `input`.
    pub input_kind: InputKind,
}

/// A class as `GET /v1/classes` lists it: every label of the store, registered or not.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassRecord {
    /// The label.
    pub label: String,
    /// Searchable items with this label.
    pub indexed: u64,
    /// Training-only examples with this label.
    pub training_only: u64,
    /// When the class was uploaded through `POST /v1/classes` (None: it only has items).
    pub registered_unix: Option<u64>,
    /// The generation expected to include it when it was uploaded.
    pub expected_generation: Option<u64>,
    /// The first generation published after the trainer learnt it.
    pub first_generation: Option<u64>,
}

/// What [`Store::delete_class`] removed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassDeletion {
    /// Ids of the searchable items that had the label.
    pub item_ids: Vec<String>,
    /// Training-only examples removed.
    pub training_only: u64,
    /// Whether the label was registered through `POST /v1/classes`.
    pub registered: bool,
}

impl ClassDeletion {
    /// Whether anything had the label.
    pub fn is_empty(&self) -> bool {
        self.item_ids.is_empty() && self.training_only == 0 && !self.registered
    }
}

fn optional_u64(what: &str, v: Option<i64>) -> Result<Option<u64>, StoreError> {
    v.map(|v| to_u64("<class>", what, v)).transpose()
}

impl Store {
    /// Registers `class` and stores its training-only `examples` in one transaction (each
    /// example takes the next sequence number). Registering a label again keeps its upload
    /// time and first generation; while it is still pending, its expected generation replaces
    /// the earlier one. Returns the last sequence number.
    pub fn add_class(
        &self,
        class: &ClassRegistration,
        examples: &[ClassExample],
    ) -> Result<u64, StoreError> {
        let label = class.label.as_str();
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut seq = read_seq(&tx)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO class_examples (id, label, input, input_kind, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for example in examples {
                check_id_free(&tx, ExampleTable::Items, &example.id)?;
                seq += 1;
                stmt.execute(params![
                    example.id,
                    label,
                    example.input,
                    serde_json::to_string(&example.input_kind)?,
                    to_i64(&example.id, "sequence", seq)?,
                ])?;
            }
        }
        register_class(&tx, class)?;
        write_seq(&tx, seq)?;
        tx.commit()?;
        Ok(seq)
    }

    /// Deletes everything with `label` in one transaction: its items, its training-only
    /// examples and its registration (one sequence number for all of it). Deleting a label
    /// nothing has changes nothing.
    pub fn delete_class(&self, label: &str) -> Result<ClassDeletion, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let item_ids = tx
            .prepare("DELETE FROM items WHERE label = ?1 RETURNING id")?
            .query_map(params![label], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let training_only = tx.execute(
            "DELETE FROM class_examples WHERE label = ?1",
            params![label],
        )?;
        let registered = tx.execute("DELETE FROM classes WHERE label = ?1", params![label])? > 0;
        let deletion = ClassDeletion {
            item_ids,
            training_only: training_only as u64,
            registered,
        };
        if !deletion.is_empty() {
            let seq = read_seq(&tx)? + 1;
            write_seq(&tx, seq)?;
            tx.commit()?;
        }
        Ok(deletion)
    }

    /// Every label in the store (items, training-only examples, registered classes) with its
    /// counts and generations, ordered by label.
    pub fn classes(&self) -> Result<Vec<ClassRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "WITH labels AS (
                 SELECT label FROM items WHERE label IS NOT NULL
                 UNION SELECT label FROM class_examples
                 UNION SELECT label FROM classes)
             SELECT l.label,
                 (SELECT COUNT(*) FROM items i WHERE i.label = l.label),
                 (SELECT COUNT(*) FROM class_examples e WHERE e.label = l.label),
                 c.created_unix, c.expected_generation, c.first_generation
             FROM labels l LEFT JOIN classes c ON c.label = l.label
             ORDER BY l.label",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?;
        rows.map(|row| {
            let (label, indexed, training_only, created, expected, first) = row?;
            Ok(ClassRecord {
                indexed: to_u64(&label, "count", indexed)?,
                training_only: to_u64(&label, "count", training_only)?,
                registered_unix: optional_u64("time", created)?,
                expected_generation: optional_u64("generation", expected)?,
                first_generation: optional_u64("generation", first)?,
                label,
            })
        })
        .collect()
    }

    /// The first generation that includes the registered class `label`: the one that did, or
    /// while it is pending the one expected to (`None`: not registered, or no trainer).
    pub fn class_generation(&self, label: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.conn();
        let generation: Option<Option<i64>> = conn
            .query_row(
                "SELECT COALESCE(first_generation, expected_generation) FROM classes
                 WHERE label = ?1",
                params![label],
                |r| r.get(0),
            )
            .optional()?;
        optional_u64("generation", generation.flatten())
    }

    /// The labels among `labels` that no item and no training-only example has (a class
    /// deleted, or whose last example was deleted or re-labelled). One indexed lookup each.
    pub fn labels_without_examples<'a>(
        &self,
        labels: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM items WHERE label = ?1)
                 OR EXISTS (SELECT 1 FROM class_examples WHERE label = ?1)",
        )?;
        let mut without = HashSet::new();
        for label in labels {
            if !stmt.query_row(params![label], |r| r.get::<_, bool>(0))? {
                without.insert(label.to_owned());
            }
        }
        Ok(without)
    }

    /// The labels the stored items with these ids have (ids without an item or a label add
    /// nothing).
    pub fn item_labels(&self, ids: &[&str]) -> Result<HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT label FROM items WHERE id = ?1")?;
        let mut labels = HashSet::new();
        for id in ids {
            let label: Option<Option<String>> =
                stmt.query_row(params![id], |r| r.get(0)).optional()?;
            labels.extend(label.flatten());
        }
        Ok(labels)
    }

    /// Labels of registered classes that no generation includes yet, ordered by label.
    pub fn pending_classes(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT label FROM classes WHERE first_generation IS NULL ORDER BY label")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records `version` as the first generation of those `labels` that have none yet;
    /// returns how many it marked.
    pub fn mark_first_generation(
        &self,
        labels: &[String],
        version: u64,
    ) -> Result<usize, StoreError> {
        let conn = self.conn();
        let version = to_i64("<generation>", "version", version)?;
        let mut stmt = conn.prepare_cached(
            "UPDATE classes SET first_generation = ?2
             WHERE label = ?1 AND first_generation IS NULL",
        )?;
        let mut marked = 0;
        for label in labels {
            marked += stmt.execute(params![label, version])?;
        }
        Ok(marked)
    }
}

/// Registers `class` inside `tx`. Registering a label again keeps its upload time and first
/// generation; while it is still pending, `expected_generation` replaces the earlier one.
pub(super) fn register_class(
    tx: &rusqlite::Transaction<'_>,
    class: &ClassRegistration,
) -> Result<(), StoreError> {
    let label = class.label.as_str();
    let expected = class
        .expected_generation
        .map(|v| to_i64(label, "generation", v))
        .transpose()?;
    tx.execute(
        "INSERT INTO classes (label, created_unix, expected_generation, first_generation)
         VALUES (?1, ?2, ?3, NULL)
         ON CONFLICT(label) DO UPDATE SET expected_generation = CASE
             WHEN classes.first_generation IS NULL THEN excluded.expected_generation
             ELSE classes.expected_generation END",
        params![label, to_i64(label, "time", class.now_unix)?, expected],
    )?;
    Ok(())
}

/// The two tables of examples, which share one id space (a build re-reading an id must find
/// one input).
#[derive(Debug, Clone, Copy)]
pub(super) enum ExampleTable {
    /// Searchable items.
    Items,
    /// Training-only class examples.
    ClassExamples,
}

/// Refuses `id` when `table` holds it.
pub(super) fn check_id_free(
    tx: &rusqlite::Transaction<'_>,
    table: ExampleTable,
    id: &str,
) -> Result<(), StoreError> {
    let (query, owner) = match table {
        ExampleTable::Items => ("SELECT 1 FROM items WHERE id = ?1", "an item"),
        ExampleTable::ClassExamples => (
            "SELECT 1 FROM class_examples WHERE id = ?1",
            "a training-only class example",
        ),
    };
    let taken = tx
        .prepare_cached(query)?
        .query_row(params![id], |_| Ok(()))
        .optional()?
        .is_some();
    if taken {
        return Err(StoreError::IdTaken {
            id: id.to_owned(),
            owner,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(label: &str, expected_generation: Option<u64>, now_unix: u64) -> ClassRegistration {
        ClassRegistration {
            label: label.into(),
            expected_generation,
            now_unix,
        }
    }

    fn example(id: &str) -> ClassExample {
        ClassExample {
            id: id.into(),
            input: id.as_bytes().to_vec(),
            input_kind: InputKind::Image,
        }
    }

    #[test]
    fn classes_are_registered_listed_and_marked_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let seq = store
                .add_class(
                    &class("shoe", Some(3), 100),
                    &[example("s1"), example("s2")],
                )
                .unwrap();
            assert_eq!(seq, 2);
            store.add_class(&class("hat", Some(3), 101), &[]).unwrap();
            assert_eq!(store.pending_classes().unwrap(), vec!["hat", "shoe"]);
            // Training-only examples are training data and have inputs, like items.
            let labelled = store.labelled_examples().unwrap();
            let ids: Vec<&str> = labelled.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, vec!["s1", "s2"]);
            assert_eq!(store.inputs_of(&["s2".into()]).unwrap()[0].input, b"s2");
            assert_eq!(store.mark_first_generation(&["shoe".into()], 4).unwrap(), 1);
            assert_eq!(store.mark_first_generation(&["shoe".into()], 5).unwrap(), 0);
            // Topping up an included class keeps its first generation and expectation.
            store
                .add_class(&class("shoe", Some(9), 102), &[example("s3")])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.pending_classes().unwrap(), vec!["hat"]);
        let classes = store.classes().unwrap();
        assert_eq!(classes.len(), 2);
        let shoe = &classes[1];
        assert_eq!(shoe.label, "shoe");
        assert_eq!(shoe.training_only, 3);
        assert_eq!(shoe.indexed, 0);
        assert_eq!(shoe.registered_unix, Some(100));
        assert_eq!(shoe.expected_generation, Some(3));
        assert_eq!(shoe.first_generation, Some(4));
        assert_eq!(classes[0].label, "hat");
        assert_eq!(classes[0].first_generation, None);
        assert!(classes.iter().all(|c| c.label != "cat"));
        // The generation an upload reports: the one that included it, else the expected one.
        assert_eq!(store.class_generation("shoe").unwrap(), Some(4));
        store.add_class(&class("hat", Some(7), 103), &[]).unwrap();
        assert_eq!(store.class_generation("hat").unwrap(), Some(7));
        assert_eq!(store.class_generation("cat").unwrap(), None);
        assert_eq!(
            store.item_count().unwrap(),
            0,
            "class examples are not items"
        );
        assert_eq!(store.last_seq().unwrap(), 3);
    }

    #[test]
    fn deleting_a_class_removes_its_items_examples_and_registration_durably() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .add_class(
                    &class("shoe", Some(3), 100),
                    &[example("s1"), example("s2")],
                )
                .unwrap();
            store
                .add_class(&class("hat", Some(3), 100), &[example("h1")])
                .unwrap();
            let item = |id: &str, label: &str| crate::store::NewItem {
                id: id.into(),
                label: Some(label.into()),
                metadata: serde_json::json!({}),
                input: vec![1],
                input_kind: InputKind::Image,
                embedding: vec![1.0, 0.0],
                model_version: 1,
            };
            store
                .upsert_items(&[item("i1", "shoe"), item("i2", "hat"), item("i3", "shoe")])
                .unwrap();
            let seq = store.last_seq().unwrap();
            let mut deletion = store.delete_class("shoe").unwrap();
            deletion.item_ids.sort();
            assert_eq!(
                deletion,
                ClassDeletion {
                    item_ids: vec!["i1".into(), "i3".into()],
                    training_only: 2,
                    registered: true,
                }
            );
            assert_eq!(store.last_seq().unwrap(), seq + 1);
            // Nothing has the label any more: deleting it again changes nothing.
            assert!(store.delete_class("shoe").unwrap().is_empty());
            assert!(store.delete_class("cat").unwrap().is_empty());
            assert_eq!(store.last_seq().unwrap(), seq + 1);
        }
        let store = Store::open(dir.path()).unwrap();
        let labels: Vec<String> = store
            .classes()
            .unwrap()
            .into_iter()
            .map(|c| c.label)
            .collect();
        assert_eq!(labels, vec!["hat"]);
        assert_eq!(store.item_count().unwrap(), 1);
        assert_eq!(store.pending_classes().unwrap(), vec!["hat"]);
        let examples: Vec<String> = store
            .labelled_examples()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(examples, vec!["h1", "i2"]);
    }

    #[test]
    fn items_and_training_only_examples_share_one_id_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let item = |id: &str| crate::store::NewItem {
            id: id.into(),
            label: Some("bag".into()),
            metadata: serde_json::json!({}),
            input: vec![1],
            input_kind: InputKind::Image,
            embedding: vec![1.0, 0.0],
            model_version: 1,
        };
        store.upsert_items(&[item("i1")]).unwrap();
        store
            .add_class(&class("shoe", None, 100), &[example("s1")])
            .unwrap();
        let seq = store.last_seq().unwrap();
        // Refused whole: the free id in the same call is not written either.
        let taken = store.upsert_items(&[item("i2"), item("s1")]);
        assert!(
            matches!(&taken, Err(StoreError::IdTaken { id, .. }) if id == "s1"),
            "{taken:?}"
        );
        let taken = store.add_class(&class("hat", None, 100), &[example("h1"), example("i1")]);
        assert!(
            matches!(&taken, Err(StoreError::IdTaken { id, .. }) if id == "i1"),
            "{taken:?}"
        );
        assert_eq!(store.last_seq().unwrap(), seq);
        let ids: Vec<String> = store
            .labelled_examples()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, vec!["i1", "s1"]);
        assert_eq!(
            store.classes().unwrap().len(),
            2,
            "the refused class was not registered"
        );
        // Replacing an item under its own id is still an upsert.
        store.upsert_items(&[item("i1")]).unwrap();
    }

    #[test]
    fn items_and_their_class_registration_are_stored_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let item = |id: &str, embedding: Vec<f32>| crate::store::NewItem {
            id: id.into(),
            label: Some("bag".into()),
            metadata: serde_json::json!({}),
            input: vec![0; 4],
            input_kind: InputKind::Tensor { shape: vec![1, 1] },
            embedding,
            model_version: 1,
        };
        let bag = class("bag", Some(2), 100);
        // The second item is refused: neither item nor the registration is written.
        let refused = store.upsert_items_registering(
            &[item("b1", vec![1.0]), item("b2", vec![f32::NAN])],
            Some(&bag),
        );
        assert!(refused.is_err());
        assert_eq!(store.item_count().unwrap(), 0);
        assert!(store.pending_classes().unwrap().is_empty());
        store
            .upsert_items_registering(&[item("b1", vec![1.0])], Some(&bag))
            .unwrap();
        assert_eq!(store.item_count().unwrap(), 1);
        assert_eq!(store.pending_classes().unwrap(), vec!["bag"]);
        let classes = store.classes().unwrap();
        assert_eq!(classes[0].indexed, 1);
        assert_eq!(classes[0].expected_generation, Some(2));
    }
}
