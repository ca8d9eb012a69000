//! Prometheus metrics: one registry per server instance, every metric registered and
//! described at start-up so `/metrics` is complete before the first request.
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

/// Reasons a request can be rejected, pre-registered as label values.
pub const REJECT_REASONS: [&str; 7] = [
    "queue_full",
    "body_too_large",
    "too_many_inputs",
    "bad_input",
    "not_found",
    "conflict",
    "not_ready",
];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by route and status.
    pub http_duration: HistogramVec,
    /// Requests rejected, by reason.
    pub rejected: IntCounterVec,
    /// Inputs waiting in the inference queue.
    pub queue_depth: IntGauge,
    /// Inputs per forward pass.
    pub batch_size: Histogram,
    /// Seconds per forward pass.
    pub inference_seconds: Histogram,
    /// Seconds per index search.
    pub search_seconds: Histogram,
    /// Live items in the served index.
    pub index_items: IntGauge,
    /// Constant 1, labelled with the served model's name, version and device.
    pub model_info: GaugeVec,
    /// Seconds the last index rebuild at start-up took.
    pub index_rebuild_seconds: Gauge,
    /// Online trainer optimisation steps.
    pub trainer_steps: IntCounter,
    /// Loss of the last trainer step.
    pub trainer_loss: Gauge,
    /// Rows filled in the XBM memory.
    pub memory_fill: IntGauge,
    /// Seconds per trainer step.
    pub trainer_step_seconds: Histogram,
    /// Trainer steps that failed (a non-finite loss, or an error) and changed nothing.
    pub trainer_failed_steps: IntCounter,
    /// Times the trainer dropped its weights after steps kept failing and restarted from the
    /// live generation.
    pub trainer_restarts: IntCounter,
    /// Generations published (built and swapped in).
    pub generations_published: IntCounter,
    /// Seconds the write lock was held for a generation's final catch-up and swap.
    pub swap_seconds: Histogram,
    /// Items re-embedded for new generations.
    pub reembedded_items: IntCounter,
    /// Fraction of the gallery re-embedded by the generation being built (1 when idle).
    pub reembed_progress: Gauge,
    /// Mean squared distance between consecutive generations' embeddings of the probe set.
    pub drift: Gauge,
    /// Uploaded classes the trainer is learning (no generation includes them yet).
    pub classes_pending: IntGauge,
    /// Uploaded classes learnt and published in a generation.
    pub classes_learnt: IntCounter,
    /// Bytes stored in the replay memory of old-class exemplars.
    pub replay_bytes: IntGauge,
}

/// Routes pre-registered in the request counters so they appear before first use.
pub const ROUTES: [&str; 17] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/info",
    "/v1/embed",
    "/v1/items",
    "/v1/items/{id}",
    "/v1/search",
    "/v1/classes",
    "/v1/classes/{label}",
    "/v1/classify",
    "/v1/trainer",
    "/v1/trainer/pause",
    "/v1/trainer/resume",
    "/v1/trainer/publish",
    "/v1/models",
    "/v1/models/{version}/activate",
];

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("crossbatch".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status.",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route and status.",
            )
            .buckets(latency_buckets()),
            &["route", "status"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new("rejected_requests_total", "Requests rejected, by reason."),
            &["reason"],
        )?;
        let queue_depth = IntGauge::new("queue_depth", "Inputs waiting in the inference queue.")?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Inputs per forward pass.")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let inference_seconds = Histogram::with_opts(
            HistogramOpts::new("inference_seconds", "Seconds per forward pass.")
                .buckets(latency_buckets()),
        )?;
        let search_seconds = Histogram::with_opts(
            HistogramOpts::new("search_seconds", "Seconds per index search.")
                .buckets(latency_buckets()),
        )?;
        let index_items = IntGauge::new("index_items", "Live items in the served index.")?;
        let model_info = GaugeVec::new(
            Opts::new(
                "model_info",
                "Served model (value 1), by name, version and device.",
            ),
            &["name", "version", "device"],
        )?;
        let index_rebuild_seconds = Gauge::new(
            "index_rebuild_seconds",
            "Seconds the index rebuild from the store took at start-up.",
        )?;
        let trainer_steps =
            IntCounter::new("trainer_steps_total", "Online trainer optimisation steps.")?;
        let trainer_loss = Gauge::new("trainer_loss", "Loss of the last online trainer step.")?;
        let memory_fill = IntGauge::new(
            "trainer_memory_fill",
            "Rows filled in the XBM cross-batch memory.",
        )?;
        let trainer_step_seconds = Histogram::with_opts(
            HistogramOpts::new("trainer_step_seconds", "Seconds per online trainer step.")
                .buckets(latency_buckets()),
        )?;
        let trainer_failed_steps = IntCounter::new(
            "trainer_failed_steps_total",
            "Online trainer steps that failed (non-finite loss or an error) and changed nothing.",
        )?;
        let trainer_restarts = IntCounter::new(
            "trainer_restarts_total",
            "Times the online trainer restarted from the live generation (10 failed steps in a row, a panicking step, or diverged weights at a publish).",
        )?;
        let generations_published = IntCounter::new(
            "generations_published_total",
            "Model generations built and swapped in.",
        )?;
        let swap_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "swap_seconds",
                "Seconds writes were held for a generation's final catch-up and swap.",
            )
            .buckets(latency_buckets()),
        )?;
        let reembedded_items = IntCounter::new(
            "reembedded_items_total",
            "Items re-embedded for new generations.",
        )?;
        let reembed_progress = Gauge::new(
            "reembed_progress_ratio",
            "Fraction of the gallery re-embedded by the generation being built (1 when idle).",
        )?;
        let drift = Gauge::new(
            "drift",
            "Mean squared distance between consecutive generations' probe-set embeddings.",
        )?;
        let classes_pending = IntGauge::new(
            "classes_pending",
            "Uploaded classes the trainer is learning (no generation includes them yet).",
        )?;
        let classes_learnt = IntCounter::new(
            "classes_learnt_total",
            "Uploaded classes learnt and published in a generation.",
        )?;
        let replay_bytes = IntGauge::new(
            "replay_bytes",
            "Bytes stored in the replay memory of old-class exemplars.",
        )?;
        reembed_progress.set(1.0);
        for metric in [
            Box::new(trainer_steps.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(trainer_loss.clone()),
            Box::new(memory_fill.clone()),
            Box::new(trainer_step_seconds.clone()),
            Box::new(trainer_failed_steps.clone()),
            Box::new(trainer_restarts.clone()),
            Box::new(generations_published.clone()),
            Box::new(swap_seconds.clone()),
            Box::new(reembedded_items.clone()),
            Box::new(reembed_progress.clone()),
            Box::new(drift.clone()),
            Box::new(classes_pending.clone()),
            Box::new(classes_learnt.clone()),
            Box::new(replay_bytes.clone()),
        ] {
            registry.register(metric)?;
        }
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(inference_seconds.clone()))?;
        registry.register(Box::new(search_seconds.clone()))?;
        registry.register(Box::new(index_items.clone()))?;
        registry.register(Box::new(model_info.clone()))?;
        registry.register(Box::new(index_rebuild_seconds.clone()))?;
        for reason in REJECT_REASONS {
            rejected.with_label_values(&[reason]);
        }
        for route in ROUTES {
            let method = match route {
                "/v1/classes/{label}" => "DELETE",
                "/v1/info" | "/v1/items/{id}" | "/v1/trainer" | "/v1/models" => "GET",
                _ if route.starts_with("/v1/") => "POST",
                _ => "GET",
            };
            http_requests.with_label_values(&[route, method, "200"]);
            http_duration.with_label_values(&[route, "200"]);
        }
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            rejected,
            queue_depth,
            batch_size,
            inference_seconds,
            search_seconds,
            index_items,
            model_info,
            index_rebuild_seconds,
            trainer_steps,
            trainer_loss,
            memory_fill,
            trainer_step_seconds,
            trainer_failed_steps,
            trainer_restarts,
            generations_published,
            swap_seconds,
            reembedded_items,
            reembed_progress,
            drift,
            classes_pending,
            classes_learnt,
            replay_bytes,
        })
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_described_before_use() {
        let metrics = Metrics::new().unwrap();
        let text = metrics.render().unwrap();
        for name in [
            "crossbatch_http_requests_total",
            "crossbatch_http_request_duration_seconds",
            "crossbatch_rejected_requests_total",
            "crossbatch_queue_depth",
            "crossbatch_batch_size",
            "crossbatch_inference_seconds",
            "crossbatch_search_seconds",
            "crossbatch_index_items",
            "crossbatch_index_rebuild_seconds",
            "crossbatch_trainer_steps_total",
            "crossbatch_trainer_loss",
            "crossbatch_trainer_memory_fill",
            "crossbatch_trainer_step_seconds",
            "crossbatch_trainer_failed_steps_total",
            "crossbatch_trainer_restarts_total",
            "crossbatch_generations_published_total",
            "crossbatch_swap_seconds",
            "crossbatch_reembedded_items_total",
            "crossbatch_reembed_progress_ratio",
            "crossbatch_drift",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} missing:\n{text}"
            );
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no type"
            );
        }
    }
}
