//! `POST /v1/items` (upsert), `GET /v1/items/{id}`, `DELETE /v1/items/{id}`.
use std::collections::HashSet;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{blocking, check_input_count, check_label, live_generation, report_index_items};
use crate::api::body::JsonBody;
use crate::api::error::ApiError;
use crate::api::input::{prepare_all, InputPayload};
use crate::api::path::PathParam;
use crate::api::AppState;
use crate::store::{InputKind, NewItem};

/// Longest accepted item id, in bytes.
pub const MAX_ID_BYTES: usize = 512;

/// Request body of `POST /v1/items`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpsertRequest {
    items: Vec<ItemPayload>,
}

/// One item to insert or replace.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemPayload {
    id: String,
    label: Option<String>,
    metadata: Option<Value>,
    image: Option<String>,
    tensor: Option<Vec<f32>>,
    shape: Option<Vec<usize>>,
}

/// Stores the items durably, then makes them searchable; answers once both are done.
pub async fn upsert_items(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<UpsertRequest>,
) -> Result<Json<Value>, ApiError> {
    check_input_count(&state, request.items.len(), "items")?;
    let generation = live_generation(&state)?;
    let mut seen = HashSet::new();
    let mut headers = Vec::with_capacity(request.items.len());
    let mut payloads = Vec::with_capacity(request.items.len());
    for (i, item) in request.items.into_iter().enumerate() {
        let what = format!("items[{i}]");
        check_id(&item.id, &what)?;
        if let Some(label) = &item.label {
            check_label(label, &format!("{what}.label"))?;
        }
        if !seen.insert(item.id.clone()) {
            return Err(ApiError::invalid(
                "duplicate_id",
                format!("{what}: id {:?} appears twice in the request", item.id),
            ));
        }
        let metadata = match item.metadata {
            None | Some(Value::Null) => json!({}),
            Some(object @ Value::Object(_)) => object,
            Some(_) => {
                return Err(ApiError::invalid(
                    "invalid_metadata",
                    format!("{what}: metadata must be a JSON object"),
                ))
            }
        };
        let input = InputPayload {
            image: item.image,
            tensor: item.tensor,
            shape: item.shape,
        };
        headers.push((item.id, item.label, metadata));
        payloads.push((input, what));
    }
    let prepared = prepare_all(payloads, generation.info.spec.input.clone()).await?;
    let (values, raws): (Vec<_>, Vec<_>) = prepared
        .into_iter()
        .map(|p| (p.values, (p.raw, p.kind)))
        .unzip();
    let embeddings = generation.embedder.embed(values).await?;
    let version = generation.version;
    let items: Vec<NewItem> = headers
        .into_iter()
        .zip(raws)
        .zip(embeddings)
        .map(
            |(((id, label, metadata), (input, input_kind)), embedding)| NewItem {
                id,
                label,
                metadata,
                input,
                input_kind,
                embedding,
                model_version: version,
            },
        )
        .collect();
    let count = items.len();
    let store = state.store.clone();
    let registry = state.registry.clone();
    let metrics = state.metrics.clone();
    let version = blocking(move || {
        let version = registry.write_items(&store, &generation, items, None)?;
        report_index_items(&registry, &metrics);
        Ok(version)
    })
    .await?;
    Ok(Json(json!({ "upserted": count, "model_version": version })))
}

/// Returns a stored item: label, metadata, embedding and the model version that made it.
pub async fn get_item(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let lookup = id.clone();
    let item = blocking(move || store.get_item(&lookup).map_err(ApiError::internal)).await?;
    let item = item.ok_or_else(|| ApiError::not_found(format!("no item with id {id:?}")))?;
    let input = match &item.input_kind {
        InputKind::Image => json!({ "kind": "image", "bytes": item.input.len() }),
        InputKind::Tensor { shape } => json!({ "kind": "tensor", "shape": shape }),
    };
    Ok(Json(json!({
        "id": item.id,
        "label": item.label,
        "metadata": item.metadata,
        "model_version": item.model_version,
        "input": input,
        "embedding": item.embedding,
    })))
}

/// Deletes an item from the store, then from the index; 404 if it does not exist.
pub async fn delete_item(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    // Refused before start-up has finished, like every write.
    live_generation(&state)?;
    let store = state.store.clone();
    let registry = state.registry.clone();
    let metrics = state.metrics.clone();
    let key = id.clone();
    let existed = blocking(move || {
        let existed = registry.delete_item(&store, &key)?;
        report_index_items(&registry, &metrics);
        Ok(existed)
    })
    .await?;
    if !existed {
        return Err(ApiError::not_found(format!("no item with id {id:?}")));
    }
    Ok(Json(json!({ "deleted": id })))
}

fn check_id(id: &str, what: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(ApiError::invalid(
            "invalid_id",
            format!("{what}: id must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "invalid_id",
            format!("{what}: id must not contain control characters"),
        ));
    }
    Ok(())
}
