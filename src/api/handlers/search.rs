//! `POST /v1/search`: k nearest neighbours of images, tensors, vectors or stored items.
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{blocking, check_embeddings, check_input_count, checked_k, live_generation};
use crate::api::body::JsonBody;
use crate::api::error::ApiError;
use crate::api::input::{normalised_vector, prepare_all, InputPayload};
use crate::api::AppState;
use crate::index::SearchHit;

/// Default number of results.
pub const DEFAULT_K: usize = 10;
/// Largest accepted `ef`.
pub const MAX_EF: usize = 10_000;

/// One query: exactly one of `image`, `tensor` (+ `shape`), `vector` or `item_id`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryPayload {
    image: Option<String>,
    tensor: Option<Vec<f32>>,
    shape: Option<Vec<usize>>,
    vector: Option<Vec<f32>>,
    item_id: Option<String>,
}

/// Restricts results.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SearchFilter {
    label: Option<String>,
}

/// Search hits whose label and metadata one store call looks up.
const METADATA_CHUNK: usize = 1024;

/// Request body of `POST /v1/search`: `query` (one) or `queries` (a batch).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    query: Option<QueryPayload>,
    queries: Option<Vec<QueryPayload>>,
    k: Option<usize>,
    filter: Option<SearchFilter>,
    ef: Option<usize>,
}

/// One result.
#[derive(Serialize)]
pub struct SearchResult {
    id: String,
    label: Option<String>,
    score: f32,
    metadata: Value,
}

/// A query after validation, before it has a vector.
enum ResolvedQuery {
    Vector(Vec<f32>),
    Input(InputPayload),
    Item(String),
}

/// Searches the live generation's index; the whole request uses one generation.
pub async fn search(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<SearchRequest>,
) -> Result<Json<Value>, ApiError> {
    let (queries, batched) = match (request.query, request.queries) {
        (Some(query), None) => (vec![query], false),
        (None, Some(queries)) => (queries, true),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give exactly one of \"query\" or \"queries\"",
            ))
        }
    };
    check_input_count(&state, queries.len(), "queries")?;
    let k = checked_k(&state, request.k, DEFAULT_K)?;
    if let Some(ef) = request.ef {
        if ef == 0 || ef > MAX_EF {
            return Err(ApiError::invalid(
                "invalid_ef",
                format!("ef must be between 1 and {MAX_EF}, got {ef}"),
            ));
        }
    }
    let label = request.filter.unwrap_or_default().label;
    let generation = live_generation(&state)?;
    let dim = generation.info.spec.embedding_dim;
    let resolved = queries
        .into_iter()
        .enumerate()
        .map(|(i, query)| resolve(query, dim, &format!("queries[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let vectors = query_vectors(&generation, resolved).await?;

    let index = generation.index.clone();
    let store = state.store.clone();
    let metrics = state.metrics.clone();
    let ef = request.ef;
    let results = blocking(move || {
        let mut all_hits: Vec<Vec<SearchHit>> = Vec::with_capacity(vectors.len());
        for vector in &vectors {
            let started = Instant::now();
            let hits = index
                .search(vector, k, ef, label.as_deref())
                .map_err(|e| ApiError::invalid("invalid_vector", e.to_string()))?;
            metrics
                .search_seconds
                .observe(started.elapsed().as_secs_f64());
            all_hits.push(hits);
        }
        let ids: Vec<String> = all_hits
            .iter()
            .flatten()
            .map(|h| h.key.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        // In chunks, so that a request with many queries and a large k lets writes through
        // between them instead of holding the store for all its lookups.
        let mut details = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(METADATA_CHUNK) {
            details.extend(
                store
                    .labels_and_metadata(chunk)
                    .map_err(ApiError::internal)?,
            );
        }
        Ok(all_hits
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    // An item deleted between search and lookup is left out.
                    .filter_map(|hit| {
                        let (label, metadata) = details.get(&hit.key).cloned()?;
                        Some(SearchResult {
                            id: hit.key,
                            label,
                            score: hit.score,
                            metadata,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>())
    })
    .await?;
    search_response(generation.version, results, batched)
}

fn search_response(
    version: u64,
    mut results: Vec<Vec<SearchResult>>,
    batched: bool,
) -> Result<Json<Value>, ApiError> {
    let results = if batched {
        serde_json::to_value(results)
    } else {
        serde_json::to_value(results.pop().unwrap_or_default())
    }
    .map_err(ApiError::internal)?;
    Ok(Json(
        serde_json::json!({ "model_version": version, "results": results }),
    ))
}

fn resolve(query: QueryPayload, dim: usize, what: &str) -> Result<ResolvedQuery, ApiError> {
    let input = InputPayload {
        image: query.image,
        tensor: query.tensor,
        shape: query.shape,
    };
    match (input.is_present(), query.vector, query.item_id) {
        (true, None, None) => Ok(ResolvedQuery::Input(input)),
        (false, Some(vector), None) => {
            Ok(ResolvedQuery::Vector(normalised_vector(vector, dim, what)?))
        }
        (false, None, Some(id)) => Ok(ResolvedQuery::Item(id)),
        _ => Err(ApiError::bad_request(
            "invalid_query",
            format!("{what}: give exactly one of \"image\", \"tensor\", \"vector\" or \"item_id\""),
        )),
    }
}

/// Turns every query into a unit vector of the generation's model: client vectors as they
/// are, stored items by their vector in the index, images and tensors through the model.
async fn query_vectors(
    generation: &crate::registry::Generation,
    resolved: Vec<ResolvedQuery>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; resolved.len()];
    let mut inputs = Vec::new();
    let mut item_ids = Vec::new();
    for (slot, query) in resolved.into_iter().enumerate() {
        match query {
            ResolvedQuery::Vector(vector) => vectors[slot] = Some(vector),
            ResolvedQuery::Input(input) => inputs.push((slot, input)),
            ResolvedQuery::Item(id) => item_ids.push((slot, id)),
        }
    }
    // A stored item is searched by the vector this generation's index holds for it, so the
    // query and the index always come from the same model.
    for (slot, id) in item_ids {
        let vector = generation.index.vector(&id);
        vectors[slot] =
            Some(vector.ok_or_else(|| ApiError::not_found(format!("no item with id {id:?}")))?);
    }
    if !inputs.is_empty() {
        let (slots, payloads): (Vec<usize>, Vec<_>) = inputs
            .into_iter()
            .map(|(slot, input)| (slot, (input, format!("queries[{slot}]"))))
            .unzip();
        let prepared = prepare_all(payloads, generation.info.spec.input.clone()).await?;
        let embedded = generation
            .embedder
            .embed(prepared.into_iter().map(|p| p.values).collect())
            .await?;
        check_embeddings(&embedded, |i| format!("queries[{}]", slots[i]))?;
        for (slot, vector) in slots.into_iter().zip(embedded) {
            vectors[slot] = Some(vector);
        }
    }
    vectors
        .into_iter()
        .map(|v| v.ok_or_else(|| ApiError::internal("a query was left without a vector")))
        .collect()
}
