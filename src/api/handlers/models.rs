//! `/v1/trainer` (status, pause, resume, publish) and `/v1/models` (generations, activate).
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{blocking, live_generation};
use crate::api::error::ApiError;
use crate::api::path::PathParam;
use crate::api::AppState;
use crate::registry::{BuildError, BuildOrigin, LastBuild};
use crate::train::online::TrainerHandle;

fn trainer(state: &AppState) -> Result<&TrainerHandle, ApiError> {
    state.trainer.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "trainer_disabled",
            "the online trainer is disabled (trainer.enabled = false)",
        )
    })
}

/// The trainer's status plus the generation being built and its re-embedding progress.
fn status_json(state: &AppState) -> Result<Value, ApiError> {
    let status = trainer(state)?.status();
    let (done, total) = state.publisher.progress();
    let last_build = state.publisher.last().map(|last| match last {
        LastBuild::Swapped(report) => json!({
            "version": report.version,
            "outcome": "swapped",
            "items": report.items,
            "build_seconds": report.build_seconds,
            "swap_seconds": report.swap_seconds,
        }),
        LastBuild::Failed { version, error } => {
            json!({ "version": version, "outcome": "failed", "error": error })
        }
    });
    let mut value = serde_json::to_value(status).map_err(ApiError::internal)?;
    value["current_generation"] = json!(state.registry.live().map(|g| g.version));
    value["building_generation"] = json!(state.registry.building_version());
    value["reembed"] = json!({ "done": done, "total": total, "busy": state.publisher.is_busy() });
    value["last_build"] = json!(last_build);
    Ok(value)
}

/// `GET /v1/trainer`.
pub async fn trainer_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(status_json(&state)?))
}

/// `POST /v1/trainer/pause`.
pub async fn trainer_pause(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    trainer(&state)?.pause();
    Ok(Json(status_json(&state)?))
}

/// `POST /v1/trainer/resume`.
pub async fn trainer_resume(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    trainer(&state)?.resume();
    Ok(Json(status_json(&state)?))
}

/// `POST /v1/trainer/publish`: publish a generation after the next step.
pub async fn trainer_publish(
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    trainer(&state)?.request_publish();
    Ok((StatusCode::ACCEPTED, Json(status_json(&state)?)))
}

/// `GET /v1/models`: every recorded generation, the active one and the one being built.
pub async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    let records = blocking(move || store.generations().map_err(ApiError::internal)).await?;
    let active = state.registry.live().map(|g| g.version);
    let generations: Vec<Value> = records
        .into_iter()
        .map(|r| {
            json!({
                "version": r.version,
                "active": Some(r.version) == active,
                "model_dir": r.model_dir,
                "created_unix": r.created_unix,
                "details": r.details,
            })
        })
        .collect();
    Ok(Json(json!({
        "active": active,
        "building": state.registry.building_version(),
        "generations": generations,
    })))
}

/// `POST /v1/models/{version}/activate`: rebuild that generation's index and swap it in.
pub async fn activate_model(
    State(state): State<AppState>,
    PathParam(version): PathParam,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let version: u64 = version
        .parse()
        .map_err(|_| ApiError::not_found(format!("no generation {version:?}")))?;
    // Before start-up has made a generation live, even one about to be recorded is not ready.
    live_generation(&state)?;
    let store = state.store.clone();
    let records = blocking(move || store.generations().map_err(ApiError::internal)).await?;
    let record = records
        .into_iter()
        .find(|r| r.version == version)
        .ok_or_else(|| ApiError::not_found(format!("no generation {version}")))?;
    if state.registry.live().is_some_and(|g| g.version == version) {
        return Ok((
            StatusCode::OK,
            Json(json!({ "active": version, "building": null })),
        ));
    }
    state
        .publisher
        .start(version, record.model_dir, BuildOrigin::Activation)
        .map_err(|e| match e {
            BuildError::Busy(busy) => ApiError::new(
                StatusCode::CONFLICT,
                "build_in_progress",
                format!("generation {busy} is being built; try again when it is live"),
            ),
            BuildError::NotReady => ApiError::not_ready(),
            other => ApiError::internal(other),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "active": state.registry.live().map(|g| g.version), "building": version })),
    ))
}
