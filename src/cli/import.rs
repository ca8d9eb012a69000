//! `crossbatch import`: load a labelled dataset into a running server through `POST /v1/items`.
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::data::{self, DatasetArgs};

/// Flags of `crossbatch import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub server: String,
    /// Items per request (at least 1; lowered to the server's `max_inputs_per_request`).
    #[arg(long, default_value_t = 64, value_parser = super::at_least(1))]
    pub batch_size: usize,
    /// Prefix of the generated item ids (`PREFIX{index}`); default: the dataset file's name
    /// and a dash.
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// The dataset.
    #[command(flatten)]
    pub dataset: DatasetArgs,
}

/// How long one request is retried while the server is busy, starting or unreachable:
/// start-up re-embeds a large store before it answers 200.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// Reads the dataset and upserts it in batches, retrying when the server says 429/503.
pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let dataset = data::load(&args.dataset)?;
    let prefix = args.id_prefix.clone().unwrap_or_else(|| {
        let name = args
            .dataset
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        format!("{}-", name.trim_end_matches(".gz"))
    });
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let url = format!("{}/v1/items", args.server.trim_end_matches('/'));
    let progress = ProgressBar::new(dataset.samples.len() as u64);
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} items  {per_sec}  eta {eta}",
    )?);
    let batch_size = batch_size_for_server(&client, &args.server, args.batch_size)?;
    for (batch_index, batch) in dataset.samples.chunks(batch_size).enumerate() {
        let mut items = Vec::with_capacity(batch.len());
        for (offset, sample) in batch.iter().enumerate() {
            let index = batch_index * batch_size + offset;
            let mut png = std::io::Cursor::new(Vec::new());
            sample.image.write_to(&mut png, image::ImageFormat::Png)?;
            items.push(json!({
                "id": format!("{prefix}{index}"),
                "label": sample.label,
                "image": base64::engine::general_purpose::STANDARD.encode(png.into_inner()),
            }));
        }
        post_with_retry(&client, &url, &json!({ "items": items })).with_context(|| {
            let first = batch_index * batch_size;
            format!(
                "batch {batch_index} (items {first}..{}); the {first} before it are stored",
                first + batch.len()
            )
        })?;
        progress.inc(batch.len() as u64);
    }
    progress.finish();
    eprintln!(
        "imported {} items into {}",
        dataset.samples.len(),
        args.server
    );
    Ok(())
}

/// POSTs JSON, backing off (for up to ten minutes) while the server is busy (429), starting
/// (503) or unreachable. Every caller's request is safe to repeat: a refused request changes
/// nothing and an upsert of the same ids is idempotent.
pub fn post_with_retry(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    send_with_retry(&format!("POST {url}"), || {
        client.post(url).json(body).send()
    })
}

/// The most inputs the server at `server` takes in one request (`/v1/info`'s
/// `limits.max_inputs_per_request`), waiting like [`post_with_retry`] while it starts.
pub fn server_input_limit(
    client: &reqwest::blocking::Client,
    server: &str,
) -> anyhow::Result<usize> {
    let url = format!("{}/v1/info", server.trim_end_matches('/'));
    let info = send_with_retry(&format!("GET {url}"), || client.get(&url).send())?;
    info["limits"]["max_inputs_per_request"]
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .with_context(|| format!("GET {url}: no limits.max_inputs_per_request in {info}"))
}

/// `batch_size`, lowered (with a note) to what the server takes in one request.
pub fn batch_size_for_server(
    client: &reqwest::blocking::Client,
    server: &str,
    batch_size: usize,
) -> anyhow::Result<usize> {
    let limit = server_input_limit(client, server)?;
    if batch_size > limit {
        eprintln!("--batch-size {batch_size} is above the server's limit; using {limit}");
    }
    Ok(batch_size.min(limit).max(1))
}

/// Whether a request that failed this way may simply be sent again: the server could not be
/// reached, did not answer in time, or the connection broke before a whole answer came (a
/// server restarting). Every request the tools send is safe to repeat (upserts replace).
fn transient(error: &reqwest::Error) -> bool {
    error.is_connect() || error.is_timeout() || error.is_request() || error.is_body()
}

/// Sends a request (again and again, for up to ten minutes with backoff) while the answer is
/// 429 or 503, the server cannot be reached, or the connection breaks before the whole answer
/// ([`transient`]); `what` names it in errors.
fn send_with_retry(
    what: &str,
    send: impl Fn() -> reqwest::Result<reqwest::blocking::Response>,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + RETRY_FOR;
    let mut delay = Duration::from_millis(50);
    let mut told = false;
    loop {
        let retry = match send() {
            Ok(response) => {
                let status = response.status();
                if status.as_u16() == 429 || status.as_u16() == 503 {
                    format!("answered {status}")
                } else {
                    match response.text() {
                        Ok(text) => {
                            anyhow::ensure!(
                                status.is_success(),
                                "{what} answered {status}: {text}"
                            );
                            return Ok(serde_json::from_str(&text)?);
                        }
                        Err(e) if transient(&e) => e.to_string(),
                        Err(e) => return Err(e).with_context(|| what.to_owned()),
                    }
                }
            }
            Err(e) if transient(&e) => e.to_string(),
            Err(e) => return Err(e).with_context(|| what.to_owned()),
        };
        if std::time::Instant::now() + delay > deadline {
            anyhow::bail!("{what}: still {retry} after {RETRY_FOR:?} of retries");
        }
        if !told {
            eprintln!("{what}: {retry}; retrying for up to {RETRY_FOR:?}");
            told = true;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
