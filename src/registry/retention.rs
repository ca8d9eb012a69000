//! Which generations stay on disk. Every trainer publish writes a checkpoint directory, so a
//! server that trains for months would fill its disk; after each publish the trainer deletes
//! its generations beyond the newest `trainer.keep_generations`, except the live one and the
//! one being built. Base models (directories the operator configured) are never deleted.
use std::path::Path;

use crate::store::{GenerationRecord, Store, StoreError};

/// The versions of the trainer generations to delete: all but the newest `keep` (0 keeps all)
/// and the `protected` ones.
pub fn to_prune(records: &[GenerationRecord], keep: usize, protected: &[u64]) -> Vec<u64> {
    if keep == 0 {
        return Vec::new();
    }
    let mut trained: Vec<u64> = records
        .iter()
        .filter(|r| r.details["origin"] == "trainer")
        .map(|r| r.version)
        .collect();
    trained.sort_unstable_by(|a, b| b.cmp(a));
    trained
        .into_iter()
        .skip(keep)
        .filter(|v| !protected.contains(v))
        .collect()
}

/// Deletes the generations [`to_prune`] names: the record first (a crash then leaves an
/// unused directory, never a record without its directory), then the directory, and only one
/// inside `generations_dir`. Returns how many were deleted.
pub fn prune(
    store: &Store,
    generations_dir: &Path,
    keep: usize,
    protected: &[u64],
) -> Result<usize, StoreError> {
    let records = store.generations()?;
    let doomed = to_prune(&records, keep, protected);
    let inside = |dir: &Path| {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        canonical(dir).starts_with(canonical(generations_dir))
    };
    for record in records.iter().filter(|r| doomed.contains(&r.version)) {
        store.delete_generation(record.version)?;
        if inside(&record.model_dir) {
            if let Err(e) = std::fs::remove_dir_all(&record.model_dir) {
                tracing::warn!(
                    version = record.version,
                    "generation forgotten but its directory not deleted: {e}"
                );
            }
        }
    }
    if !doomed.is_empty() {
        tracing::info!(deleted = doomed.len(), keep, "old generations deleted");
    }
    Ok(doomed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(version: u64, origin: &str, dir: &Path) -> GenerationRecord {
        GenerationRecord {
            version,
            model_dir: dir.join(version.to_string()),
            created_unix: version,
            details: serde_json::json!({ "origin": origin }),
        }
    }

    #[test]
    fn the_newest_trainer_generations_the_live_one_and_base_models_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let generations = dir.path().join("generations");
        let base = tempfile::tempdir().unwrap();
        let mut records = vec![record(1, "base", base.path())];
        records.extend((2..=7).map(|v| record(v, "trainer", &generations)));
        for r in &records {
            std::fs::create_dir_all(&r.model_dir).unwrap();
            store.record_generation(r).unwrap();
        }
        // Keep the newest 2 (7, 6), and 3, which is live.
        assert_eq!(to_prune(&records, 2, &[3]), [5, 4, 2]);
        assert!(to_prune(&records, 0, &[]).is_empty(), "0 keeps all");
        assert_eq!(prune(&store, &generations, 2, &[3]).unwrap(), 3);
        let left: Vec<u64> = store
            .generations()
            .unwrap()
            .iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(left, [1, 3, 6, 7]);
        for r in &records {
            assert_eq!(
                r.model_dir.exists(),
                left.contains(&r.version),
                "generation {}",
                r.version
            );
        }
        assert!(
            base.path().join("1").exists(),
            "a base model is never deleted"
        );
        assert_eq!(prune(&store, &generations, 2, &[3]).unwrap(), 0);
    }
}
