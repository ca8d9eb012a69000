//! `POST /v1/classes` (upload a class with examples), `GET /v1/classes` (list classes),
//! `DELETE /v1/classes/{label}` (delete a class) and `POST /v1/classify` (label probabilities
//! for inputs).
use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    blocking, check_embeddings, check_input_count, check_label, checked_k, live_generation,
    prepare_inputs, report_index_items,
};
use crate::api::body::JsonBody;
use crate::api::error::ApiError;
use crate::api::input::{prepare_all, InputPayload};
use crate::api::path::PathParam;
use crate::api::AppState;
use crate::classify::{cosine, predict, Prediction};
use crate::store::{ClassExample, ClassRegistration, NewItem};

/// Number of predictions per input when the request gives no `k`.
const DEFAULT_K: usize = 5;

/// Logit scale of nearest-class-mean candidates when no head gives one.
const FALLBACK_SCALE: f32 = 16.0;

/// Request body of `POST /v1/classes`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClassRequest {
    label: String,
    examples: Vec<InputPayload>,
    /// Also make the examples searchable items (default true).
    index: Option<bool>,
}

/// Response of `POST /v1/classes`.
#[derive(Serialize)]
pub struct NewClassResponse {
    label: String,
    stored: usize,
    /// The examples' ids (`LABEL#hex`; percent-encode the `#` in an item URL).
    ids: Vec<String>,
    indexed: bool,
    /// The first generation that includes the class: expected, while it is being learnt, or
    /// the one that did for a class learnt earlier (None without a trainer).
    first_generation: Option<u64>,
}

/// A fresh example id: the label and a random suffix (ids of items and class examples share
/// one space).
fn example_id(label: &str) -> String {
    format!("{label}#{:016x}", rand::random::<u64>())
}

/// Stores a class's examples durably (as searchable items when `index`, else as training-only
/// examples), registers the class and tells the trainer; answers once all of it is durable.
pub async fn create_class(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<NewClassRequest>,
) -> Result<Json<NewClassResponse>, ApiError> {
    check_label(&request.label, "label")?;
    check_input_count(&state, request.examples.len(), "examples")?;
    let generation = live_generation(&state)?;
    let payloads = request
        .examples
        .into_iter()
        .enumerate()
        .map(|(i, example)| (example, format!("examples[{i}]")))
        .collect();
    let prepared = prepare_all(payloads, generation.info.spec.input.clone()).await?;
    let stored = prepared.len();
    let label = request.label;
    let ids: Vec<String> = (0..stored).map(|_| example_id(&label)).collect();
    let response_ids = ids.clone();
    let index = request.index.unwrap_or(true);
    let embeddings = if index {
        let values = prepared.iter().map(|p| p.values.clone()).collect();
        let embeddings = generation.embedder.embed(values).await?;
        check_embeddings(&embeddings, |i| format!("examples[{i}]"))?;
        Some(embeddings)
    } else {
        None
    };
    let store = state.store.clone();
    let registry = state.registry.clone();
    let trainer = state.trainer.clone();
    let metrics = state.metrics.clone();
    let response_label = label.clone();
    let first_generation = blocking(move || {
        // Held until the class is stored: the trainer keeps the expected generation for it.
        let upload = trainer
            .as_ref()
            .map(|t| t.expect_class(&store))
            .transpose()
            .map_err(ApiError::internal)?;
        let expected = upload.as_ref().map(|u| u.expected_generation);
        let class = ClassRegistration {
            label: label.clone(),
            expected_generation: expected,
            now_unix: crate::server::unix_now(),
        };
        // The examples and the registration go into the store in one transaction.
        match embeddings {
            Some(embeddings) => {
                let items: Vec<NewItem> = prepared
                    .into_iter()
                    .zip(embeddings)
                    .zip(ids)
                    .map(|((p, embedding), id)| NewItem {
                        id,
                        label: Some(label.clone()),
                        metadata: json!({ "class_upload": true }),
                        input: p.raw,
                        input_kind: p.kind,
                        embedding,
                        model_version: generation.version,
                    })
                    .collect();
                registry.write_items(&store, &generation, items, Some(&class))?;
                report_index_items(&registry, &metrics);
            }
            None => {
                let examples: Vec<ClassExample> = prepared
                    .into_iter()
                    .zip(ids)
                    .map(|(p, id)| ClassExample {
                        id,
                        input: p.raw,
                        input_kind: p.kind,
                    })
                    .collect();
                registry.add_training_examples(&store, &class, &examples)?;
            }
        }
        // The trainer re-reads the store now that the class is in it.
        drop(upload);
        // More examples of a class learnt earlier do not make it pending again.
        store.class_generation(&label).map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(NewClassResponse {
        label: response_label,
        stored,
        ids: response_ids,
        indexed: index,
        first_generation,
    }))
}

/// Response of `DELETE /v1/classes/{label}`.
#[derive(Serialize)]
pub struct DeleteClassResponse {
    label: String,
    /// Searchable items deleted.
    deleted_items: usize,
    /// Training-only examples deleted.
    deleted_training_only: u64,
    /// Whether the label had been uploaded as a class (its registration is gone too).
    was_registered: bool,
}

/// Deletes everything stored with a label — items, training-only examples, the class
/// registration — in one transaction, and its items from the index; 404 if nothing has it.
/// The trainer forgets the class at its next read of the store and publishes a generation
/// without it.
pub async fn delete_class(
    State(state): State<AppState>,
    PathParam(label): PathParam,
) -> Result<Json<DeleteClassResponse>, ApiError> {
    check_label(&label, "label")?;
    // Refused before start-up has finished, like every write.
    live_generation(&state)?;
    let store = state.store.clone();
    let registry = state.registry.clone();
    let metrics = state.metrics.clone();
    let trainer = state.trainer.clone();
    let key = label.clone();
    let deletion = blocking(move || {
        // Held until the deletion is committed: no publish starts with the class meanwhile.
        let _removal = trainer.as_ref().map(|t| t.delete_class());
        let deletion = registry.delete_class(&store, &key)?;
        report_index_items(&registry, &metrics);
        Ok(deletion)
    })
    .await?;
    if deletion.is_empty() {
        return Err(ApiError::not_found(format!(
            "nothing has the label {label:?}"
        )));
    }
    Ok(Json(DeleteClassResponse {
        label,
        deleted_items: deletion.item_ids.len(),
        deleted_training_only: deletion.training_only,
        was_registered: deletion.registered,
    }))
}

/// Every class with its example counts, replay-memory share and generations, and the rendering
/// the live head classifies.
pub async fn list_classes(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let records = blocking(move || store.classes().map_err(ApiError::internal)).await?;
    let replay = state
        .trainer
        .as_ref()
        .map(|t| t.replay_status())
        .unwrap_or_default();
    let live = state.registry.live();
    let live_head = live.as_ref().and_then(|g| g.head.clone());
    let withdrawn = live.map(|g| g.withdrawn_labels()).unwrap_or_default();
    let head_labels: HashSet<String> = live_head
        .as_ref()
        .map(|h| {
            h.snapshot
                .labels
                .iter()
                .filter(|l| !withdrawn.contains(*l))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let head_input = live_head.and_then(|h| h.snapshot.low_fidelity_input);
    let classes: Vec<Value> = records
        .into_iter()
        .map(|r| {
            let share = replay.classes.get(&r.label);
            json!({
                "label": r.label,
                "examples": r.indexed + r.training_only,
                "indexed": r.indexed,
                "training_only": r.training_only,
                "replay_exemplars": share.map_or(0, |s| s.exemplars),
                "replay_bytes": share.map_or(0, |s| s.bytes),
                "replay_share": share.map_or(0.0, |s| {
                    s.bytes as f64 / replay.budget_bytes.max(1) as f64
                }),
                "in_head": head_labels.contains(&r.label),
                "registered_unix": r.registered_unix,
                "expected_generation": r.expected_generation,
                "first_generation": r.first_generation,
            })
        })
        .collect();
    Ok(Json(json!({
        "classes": classes,
        "replay": { "budget_bytes": replay.budget_bytes, "used_bytes": replay.used_bytes },
        "head_low_fidelity_input": head_input,
    })))
}

/// Request body of `POST /v1/classify`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    inputs: Vec<InputPayload>,
    k: Option<usize>,
}

/// Response of `POST /v1/classify`.
#[derive(Serialize)]
pub struct ClassifyResponse {
    model_version: u64,
    predictions: Vec<Vec<Prediction>>,
}

/// Label probabilities for each input from the live generation's class head (on the input's
/// low-fidelity rendering when the head was trained with low-fidelity replay), with labels the
/// head has not learnt yet scored by the normalised mean of their indexed items.
pub async fn classify(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    check_input_count(&state, request.inputs.len(), "inputs")?;
    let k = checked_k(&state, request.k, DEFAULT_K)?;
    let generation = live_generation(&state)?;
    let values = prepare_inputs(&generation, request.inputs).await?;
    let head = generation.head.clone();
    // Head classes deleted since the head was trained are left out.
    let withdrawn = generation.withdrawn_labels();
    let head_serves = move |label: &str| !withdrawn.contains(label);
    let served_classes = head.as_ref().map_or(0, |h| {
        h.snapshot.labels.iter().filter(|l| head_serves(l)).count()
    });
    // Labels the head lacks: the normalised mean of their items in this generation's index.
    let known: HashSet<String> = head
        .as_ref()
        .map(|h| h.snapshot.labels.iter().cloned().collect())
        .unwrap_or_default();
    // The index keeps per-label running sums: O(labels × dim), no scan, but off the runtime.
    let index = generation.index.clone();
    let means = blocking(move || Ok(index.label_means(|label| !known.contains(label)))).await?;
    if served_classes == 0 && means.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_classes",
            "no class is known yet: upload labelled items or POST /v1/classes",
        ));
    }
    // The renderings a low-fidelity head classifies; the inputs as they are are embedded only
    // when something scores them (the head does not render, or there are class means).
    let rendered = match head.clone() {
        Some(head) if head.renders_inputs() => {
            let inputs = values.clone();
            let rendered = blocking(move || {
                inputs
                    .iter()
                    .map(|v| head.render(v))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ApiError::internal)
            })
            .await?;
            Some(rendered)
        }
        _ => None,
    };
    let renders = rendered.is_some();
    let mut batch = if !renders || !means.is_empty() {
        values
    } else {
        Vec::new()
    };
    let as_is = batch.len();
    batch.extend(rendered.into_iter().flatten());
    let expected = batch.len();
    let mut input_embeddings = generation.embedder.embed(batch).await?;
    if input_embeddings.len() != expected {
        return Err(ApiError::internal(format!(
            "the embedder answered {} embeddings for {expected} inputs",
            input_embeddings.len()
        )));
    }
    check_embeddings(&input_embeddings, |i| {
        if i < as_is {
            format!("inputs[{i}]")
        } else {
            format!("inputs[{}] (low-fidelity rendering)", i - as_is)
        }
    })?;
    let rendered_embeddings = input_embeddings.split_off(as_is);
    let predictions = blocking(move || {
        let head = head.as_deref().map(|h| &h.snapshot);
        let scale = head.map_or(FALLBACK_SCALE, |h| h.scale);
        let head_queries = if renders {
            &rendered_embeddings
        } else {
            &input_embeddings
        };
        Ok(head_queries
            .iter()
            .enumerate()
            .map(|(i, head_query)| {
                // The head scores the input as it classifies it, class means the input itself.
                let head_scores = head
                    .into_iter()
                    .flat_map(|h| h.classes())
                    .filter(|(label, _)| head_serves(label))
                    .map(|(label, proxy)| (label, cosine(head_query, proxy)));
                let mean_scores = input_embeddings.get(i).into_iter().flat_map(|input| {
                    means
                        .iter()
                        .map(|(label, mean)| (label.as_str(), cosine(input, mean)))
                });
                predict(head_scores.chain(mean_scores), scale, k)
            })
            .collect())
    })
    .await?;
    Ok(Json(ClassifyResponse {
        model_version: generation.version,
        predictions,
    }))
}
