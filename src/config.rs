//! Configuration: one typed tree read once at start-up.
//!
//! Layers, each overriding the one before: the built-in defaults (`config/default.toml`,
//! compiled in), an optional file (`--config FILE`), environment variables
//! `CROSSBATCH__SECTION__KEY`, and finally command-line flags (applied by the CLI).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::index::IndexParams;

/// The defaults, identical to `config/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "CROSSBATCH__";

/// Longest accepted duration setting, in seconds (a day): larger ones overflow the clock
/// arithmetic that uses them.
const MAX_SECONDS: u64 = 86_400;

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP server and storage.
    pub server: ServerConfig,
    /// Which model to serve and where.
    pub model: ModelConfig,
    /// Dynamic batching and admission control.
    pub batching: BatchingConfig,
    /// HNSW index parameters.
    pub index: IndexParams,
    /// Search limits.
    pub search: SearchConfig,
    /// The online trainer.
    pub trainer: TrainerConfig,
}

/// `[trainer]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Run the background trainer.
    pub enabled: bool,
    /// Start paused.
    pub start_paused: bool,
    /// Adam learning rate.
    pub lr: f64,
    /// Classes per batch (P).
    pub classes_per_batch: usize,
    /// Examples per class (K).
    pub per_class: usize,
    /// Fraction of wall time spent stepping.
    pub duty_cycle: f64,
    /// Steps between published generations.
    pub publish_every: usize,
    /// Trainer generations kept on disk, the newest (0 = all); older ones are deleted.
    pub keep_generations: usize,
    /// Most items re-embedded per second while building a generation (0 = unlimited).
    pub reembed_rate: f64,
    /// Labelled items embedded by consecutive generations to measure drift.
    pub probe_size: usize,
    /// Largest random translation in pixels.
    pub max_shift: usize,
    /// Random horizontal flips.
    pub flip: bool,
    /// Loss and XBM memory.
    pub objective: crate::train::objective::Objective,
    /// How uploaded classes are learnt (class head, replay, LEO).
    pub classes: crate::train::incremental::ClassLearningConfig,
}

/// `[server]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address, `HOST:PORT`.
    pub addr: String,
    /// Directory of the durable store.
    pub data_dir: PathBuf,
    /// Largest accepted request body in bytes.
    pub body_limit_bytes: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_grace_seconds: u64,
}

/// `[model]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model directory (model.toml + weights).
    pub dir: PathBuf,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// libtorch intra-op threads; 0 = number of cores.
    pub threads: usize,
}

/// `[batching]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most inputs per forward pass.
    pub max_batch: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub max_wait_ms: u64,
    /// Inputs allowed to wait in the queue before 429.
    pub queue_capacity: usize,
    /// Most inputs one request may carry.
    pub max_inputs_per_request: usize,
}

/// `[search]` settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// Largest accepted k.
    pub max_k: usize,
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The override file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File involved.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A layer is not valid TOML or does not fit the schema.
    #[error("invalid configuration ({origin}): {message}")]
    Invalid {
        /// Which layer: the file path or the environment variable.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads defaults, then `file` if given, then `CROSSBATCH__*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut merged = parse_layer(DEFAULT_TOML, "built-in defaults")?;
        if let Some(path) = file {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            merge(&mut merged, parse_layer(&text, &shown)?);
        }
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            merge(&mut merged, env_layer(&path, &raw));
        }
        let config: Config =
            merged
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: "merged layers".into(),
                    message: e.to_string(),
                })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: "merged layers".into(),
            message,
        })?;
        Ok(config)
    }

    /// Values that parse but could never work (a refusal of every request, a panic in a
    /// worker thread, an allocation of exabytes) are refused at start-up, named.
    fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
        let (batching, trainer) = (&self.batching, &self.trainer);
        check(
            self.server.body_limit_bytes >= 1024,
            "server.body_limit_bytes must be at least 1024",
        )?;
        check(
            self.model.threads <= 1024,
            "model.threads must be at most 1024 (0 = libtorch's default)",
        )?;
        check(
            batching.max_inputs_per_request >= 1,
            "batching.max_inputs_per_request must be at least 1",
        )?;
        check(
            batching.queue_capacity >= batching.max_inputs_per_request,
            "batching.queue_capacity must be at least batching.max_inputs_per_request (a larger \
             request could never be admitted)",
        )?;
        check(self.search.max_k >= 1, "search.max_k must be at least 1")?;
        check(
            (1..=1 << 32).contains(&self.index.max_elements),
            "index.max_elements must be 1 to 2^32",
        )?;
        check(
            trainer.duty_cycle.is_finite() && trainer.duty_cycle > 0.0 && trainer.duty_cycle <= 1.0,
            "trainer.duty_cycle must be in (0, 1]",
        )?;
        check(
            trainer.reembed_rate == 0.0
                || (trainer.reembed_rate.is_finite() && trainer.reembed_rate >= 1.0),
            "trainer.reembed_rate must be 0 (unlimited) or at least 1 item per second",
        )?;
        check(
            trainer.lr.is_finite() && trainer.lr > 0.0,
            "trainer.lr must be positive",
        )?;
        check(
            trainer.publish_every >= 1,
            "trainer.publish_every must be at least 1",
        )?;
        check(
            trainer.classes_per_batch >= 2 && trainer.per_class >= 2,
            "trainer.classes_per_batch and trainer.per_class must be at least 2 (a batch needs \
             negatives and positives)",
        )?;
        check(
            self.server.shutdown_grace_seconds <= MAX_SECONDS
                && batching.max_wait_ms <= MAX_SECONDS * 1000,
            "server.shutdown_grace_seconds and batching.max_wait_ms must be at most a day",
        )?;
        trainer
            .objective
            .validate()
            .map_err(|e| format!("trainer.objective.{e}"))?;
        trainer
            .classes
            .validate()
            .map_err(|e| format!("trainer.classes: {e}"))
    }

    /// Reads the configuration as `serve` does: optional file plus the process environment
    /// (variables whose name or value is not UTF-8 are not ours and are passed over; one of
    /// ours with such a value is refused).
    pub fn from_process(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Ok(name) = name.into_string() else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((name, value)),
                Err(_) if name.starts_with(ENV_PREFIX) => {
                    return Err(ConfigError::Invalid {
                        origin: name,
                        message: "the value is not UTF-8".into(),
                    })
                }
                Err(_) => {}
            }
        }
        Config::load(file, vars)
    }
}

fn parse_layer(text: &str, origin: &str) -> Result<toml::Value, ConfigError> {
    text.parse::<toml::Table>()
        .map(toml::Value::Table)
        .map_err(|e| ConfigError::Invalid {
            origin: origin.into(),
            message: e.to_string(),
        })
}

/// A one-key layer from an environment variable; the value is read as a TOML value
/// (number, boolean, quoted string) when it parses as one, else as a plain string.
fn env_layer(path: &[String], raw: &str) -> toml::Value {
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    path.iter().rev().fold(value, |inner, key| {
        let mut table = toml::Table::new();
        table.insert(key.clone(), inner);
        toml::Value::Table(table)
    })
}

fn merge(base: &mut toml::Value, layer: toml::Value) {
    match (base, layer) {
        (toml::Value::Table(base), toml::Value::Table(layer)) => {
            for (key, value) in layer {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, layer) => *base = layer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn defaults_parse_and_match_the_documented_values() {
        let config = Config::load(None, no_env()).unwrap();
        assert_eq!(config.server.addr, "127.0.0.1:8080");
        assert_eq!(config.server.data_dir, PathBuf::from("./data"));
        assert_eq!(config.model.dir, PathBuf::from("models/default"));
        assert_eq!(config.model.device, "auto");
        assert_eq!(config.index.m, 16);
        // The Rust defaults (what tests and library users start from) are the shipped ones.
        assert_eq!(
            config.trainer.classes,
            crate::train::incremental::ClassLearningConfig::default()
        );
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\naddr = \"0.0.0.0:9000\"\n[index]\nm = 8\n").unwrap();
        let env = vec![
            ("CROSSBATCH__INDEX__M".to_string(), "24".to_string()),
            ("CROSSBATCH__MODEL__DEVICE".to_string(), "cpu".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let config = Config::load(Some(&file), env).unwrap();
        assert_eq!(config.server.addr, "0.0.0.0:9000");
        assert_eq!(config.index.m, 24);
        assert_eq!(config.model.device, "cpu");
        assert_eq!(
            config.index.ef_search, 64,
            "untouched keys keep their defaults"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let env = vec![("CROSSBATCH__SERVER__ADRESS".to_string(), "x".to_string())];
        assert!(Config::load(None, env).is_err());
        let env = vec![("CROSSBATCH__INDEX__EFSEARCH".to_string(), "128".to_string())];
        assert!(
            Config::load(None, env).is_err(),
            "a misspelt index key is an error"
        );
        for (key, value, named) in [
            ("TRAINER__DUTY_CYCLE", "nan", "duty_cycle"),
            ("TRAINER__DUTY_CYCLE", "0", "duty_cycle"),
            ("TRAINER__REEMBED_RATE", "1e-300", "reembed_rate"),
            ("TRAINER__LR", "-1", "lr"),
            ("MODEL__THREADS", "4294967296", "threads"),
            ("INDEX__MAX_ELEMENTS", "9000000000000000000", "max_elements"),
            ("BATCHING__QUEUE_CAPACITY", "8", "queue_capacity"),
            (
                "BATCHING__MAX_INPUTS_PER_REQUEST",
                "0",
                "max_inputs_per_request",
            ),
            ("SEARCH__MAX_K", "0", "max_k"),
            ("SERVER__BODY_LIMIT_BYTES", "10", "body_limit_bytes"),
            ("TRAINER__CLASSES__HEAD_WEIGHT", "-1", "head_weight"),
            ("TRAINER__PUBLISH_EVERY", "0", "publish_every"),
            ("TRAINER__CLASSES_PER_BATCH", "1", "classes_per_batch"),
            ("TRAINER__PER_CLASS", "0", "per_class"),
            (
                "SERVER__SHUTDOWN_GRACE_SECONDS",
                "18446744073709551615",
                "shutdown_grace",
            ),
            (
                "BATCHING__MAX_WAIT_MS",
                "18446744073709551615",
                "max_wait_ms",
            ),
            ("TRAINER__OBJECTIVE__MEMORY_WEIGHT", "nan", "memory_weight"),
            (
                "TRAINER__OBJECTIVE__MEMORY_SIZE",
                "10000000000",
                "memory_size",
            ),
            (
                "TRAINER__OBJECTIVE__GRADCACHE_CHUNK",
                "16",
                "trainer.objective.gradcache_chunk",
            ),
        ] {
            let env = vec![(format!("CROSSBATCH__{key}"), value.to_string())];
            let error = Config::load(None, env).unwrap_err().to_string();
            assert!(error.contains(named), "{key}={value}: {error}");
        }
        let env = vec![("CROSSBATCH__INDEX__M".to_string(), "many".to_string())];
        assert!(Config::load(None, env).is_err());
    }
}
