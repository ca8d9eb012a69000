//! `crossbatch eval`: leave-one-out retrieval quality of a model (offline) or of a running
//! server (through `POST /v1/embed`) on a labelled dataset.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::import::{batch_size_for_server, post_with_retry};
use crate::data::{self, Dataset, DatasetArgs};
use crate::embed::preprocess::image_to_input;
use crate::eval::{evaluate_vectors, EvalReport};
use crate::model::LoadedModel;

/// Images per forward pass offline.
const MODEL_BATCH: usize = 256;

/// Arguments of `crossbatch eval`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "server"])))]
pub struct EvalArgs {
    /// Model directory to evaluate offline.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Base URL of a running server to evaluate through its API (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    pub server: Option<String>,
    /// The dataset.
    #[command(flatten)]
    pub dataset: DatasetArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Device for --model: auto, cpu or cuda:N.
    #[arg(long, default_value = "auto", conflicts_with = "server")]
    pub device: String,
    /// Images per `/v1/embed` request with --server (at least 1; lowered to the server's
    /// `max_inputs_per_request`; lower it for large photos: each request must stay under the
    /// server's body limit).
    #[arg(long, default_value_t = 64, conflicts_with = "model", value_parser = super::at_least(1))]
    pub batch_size: usize,
}

fn progress(n: usize) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} embedded  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Embeds the dataset with a local model.
pub fn embed_with_model(model: &LoadedModel, dataset: &Dataset) -> anyhow::Result<Vec<Vec<f32>>> {
    let spec = model.spec().input.clone();
    let bar = progress(dataset.len());
    let mut out = Vec::with_capacity(dataset.len());
    for chunk in dataset.samples.chunks(MODEL_BATCH) {
        let values: Vec<f32> = chunk
            .iter()
            .flat_map(|s| image_to_input(&s.image, &spec))
            .collect();
        out.extend(model.embed_values(&values, chunk.len())?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

#[derive(Deserialize)]
struct EmbedResponse {
    model_version: u64,
    embeddings: Vec<Vec<f32>>,
}

/// Passes over the dataset before giving up when the server swaps generations midway.
const SWAP_PASSES: usize = 4;

/// Embeds the dataset through a running server's `POST /v1/embed`, `batch_size` images per
/// request. Every embedding of the result comes from one model generation: when the server
/// swaps generations midway (its online trainer publishes), embedding starts over. Returns
/// the embeddings and that generation's version.
pub fn embed_with_server(
    server: &str,
    dataset: &Dataset,
    batch_size: usize,
) -> anyhow::Result<(Vec<Vec<f32>>, u64)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let url = format!("{}/v1/embed", server.trim_end_matches('/'));
    let batch_size = batch_size_for_server(&client, server, batch_size)?;
    let body = |chunk: &[data::Sample]| -> anyhow::Result<serde_json::Value> {
        let mut inputs = Vec::with_capacity(chunk.len());
        for sample in chunk {
            let mut png = std::io::Cursor::new(Vec::new());
            sample.image.write_to(&mut png, image::ImageFormat::Png)?;
            let encoded = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
            inputs.push(serde_json::json!({ "image": encoded }));
        }
        Ok(serde_json::json!({ "inputs": inputs }))
    };
    for _ in 0..SWAP_PASSES {
        let bar = progress(dataset.len());
        let mut out = Vec::with_capacity(dataset.len());
        let mut version = None;
        for chunk in dataset.samples.chunks(batch_size) {
            let answer = post_with_retry(&client, &url, &body(chunk)?)?;
            let answer: EmbedResponse = serde_json::from_value(answer)
                .with_context(|| format!("POST {url}: bad response"))?;
            anyhow::ensure!(
                answer.embeddings.len() == chunk.len(),
                "POST {url}: {} embeddings for {} inputs",
                answer.embeddings.len(),
                chunk.len()
            );
            if *version.get_or_insert(answer.model_version) != answer.model_version {
                break;
            }
            out.extend(answer.embeddings);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        match version {
            Some(version) if out.len() == dataset.len() => return Ok((out, version)),
            Some(version) => eprintln!(
                "the server swapped generations (from {version}) while embedding; starting over"
            ),
            None => anyhow::bail!("the dataset is empty"),
        }
    }
    anyhow::bail!(
        "the server swapped generations during each of {SWAP_PASSES} passes over the dataset; \
         pause its trainer (POST /v1/trainer/pause) and evaluate again"
    )
}

/// Loads the dataset, embeds it with the chosen source and computes the report.
pub fn report(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let dataset = data::load(&args.dataset)?;
    let embeddings = match (&args.model, &args.server) {
        (Some(dir), _) => {
            let device = crate::model::parse_device(&args.device)?;
            let model = LoadedModel::load(dir, device)
                .with_context(|| format!("loading {}", dir.display()))?;
            embed_with_model(&model, &dataset)?
        }
        (None, Some(server)) => {
            let (embeddings, version) = embed_with_server(server, &dataset, args.batch_size)?;
            eprintln!("embedded by the server's model generation {version}");
            embeddings
        }
        (None, None) => anyhow::bail!("one of --model or --server is required"),
    };
    Ok(evaluate_vectors(&embeddings, &dataset.labels())?)
}

/// Runs `crossbatch eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let report = report(&args)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: EvalArgs,
    }

    #[test]
    fn exactly_one_source_is_required() {
        assert!(Wrap::try_parse_from(["eval", "x"]).is_err());
        assert!(
            Wrap::try_parse_from(["eval", "--model", "m", "--server", "http://h", "x"]).is_err()
        );
        let w =
            Wrap::try_parse_from(["eval", "--model", "m", "--json", "--limit", "3", "x"]).unwrap();
        assert!(w.args.json);
        assert_eq!(w.args.dataset.limit, Some(3));
    }
}
