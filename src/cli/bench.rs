//! `crossbatch bench`: throughput and quality figures measured side by side in one run.
//!
//! 1. Embedding: images/s through the model directly vs through `POST /v1/embed` of an
//!    in-process server on the same model and device.
//! 2. Search: queries/s and recall@10 of the HNSW index vs exact brute-force search.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::Config;
use crate::data::{self, DatasetArgs, DatasetFormat};
use crate::embed::preprocess::image_to_input;
use crate::index::{IndexParams, VectorIndex};
use crate::model::LoadedModel;

/// Flags of `crossbatch bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model to benchmark.
    #[arg(long, default_value = "models/default")]
    pub model: PathBuf,
    /// auto | cpu | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Fashion-MNIST images file used as embedding input.
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
    )]
    pub images: PathBuf,
    /// Fashion-MNIST labels file matching `--images`.
    #[arg(
        long,
        default_value = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    )]
    pub labels: PathBuf,
    /// Images embedded per measurement.
    #[arg(long, default_value_t = 2048)]
    pub embed_images: usize,
    /// Images per HTTP request.
    #[arg(long, default_value_t = 32)]
    pub request_size: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Vectors in the search benchmark.
    #[arg(long, default_value_t = 100_000)]
    pub vectors: usize,
    /// Dimension of the search benchmark's vectors.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Queries in the search benchmark.
    #[arg(long, default_value_t = 1_000)]
    pub queries: usize,
    /// Skip the embedding part.
    #[arg(long)]
    pub skip_embed: bool,
    /// Skip the search part.
    #[arg(long)]
    pub skip_search: bool,
}

/// Runs the benchmarks and prints one table per part.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.queries > 0 && args.vectors > 0,
        "--queries and --vectors must be positive"
    );
    if !args.skip_embed {
        embed_benchmark(&args)?;
    }
    if !args.skip_search {
        search_benchmark(&args)?;
    }
    Ok(())
}

fn embed_benchmark(args: &BenchArgs) -> anyhow::Result<()> {
    let dataset = data::load(&DatasetArgs {
        format: DatasetFormat::Idx,
        labels: Some(args.labels.clone()),
        limit: Some(args.embed_images),
        path: args.images.clone(),
    })?;
    let n = dataset.samples.len();
    let device = crate::model::parse_device(&args.device)?;
    let model = LoadedModel::load(&args.model, device)?;
    let spec = model.spec().clone();
    let values: Vec<f32> = dataset
        .samples
        .iter()
        .flat_map(|s| image_to_input(&s.image, &spec.input))
        .collect();
    let numel = spec.input.numel();
    let batch = 64usize;
    model.embed_values(&values[..numel * batch.min(n)], batch.min(n))?;
    let started = Instant::now();
    for chunk in values.chunks(numel * batch) {
        model.embed_values(chunk, chunk.len() / numel)?;
    }
    let direct = n as f64 / started.elapsed().as_secs_f64();
    drop(model);

    let pngs: Vec<String> = dataset
        .samples
        .iter()
        .map(|s| {
            let mut png = std::io::Cursor::new(Vec::new());
            s.image.write_to(&mut png, image::ImageFormat::Png)?;
            Ok(base64::engine::general_purpose::STANDARD.encode(png.into_inner()))
        })
        .collect::<anyhow::Result<_>>()?;
    let data_dir = std::env::temp_dir().join(format!("crossbatch-bench-{}", std::process::id()));
    let mut config = Config::load(None, Vec::new())?;
    config.server.addr = "127.0.0.1:0".into();
    config.server.data_dir = data_dir.clone();
    config.model.dir = args.model.clone();
    config.model.device = args.device.clone();
    config.trainer.enabled = false;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = runtime.block_on(crate::server::start(config, std::future::pending()))?;
    let url = format!("http://{}", server.addr);
    wait_ready(&url)?;
    let requests: Vec<serde_json::Value> = pngs
        .chunks(args.request_size.max(1))
        .map(|chunk| {
            let inputs: Vec<_> = chunk
                .iter()
                .map(|p| serde_json::json!({ "image": p }))
                .collect();
            serde_json::json!({ "inputs": inputs })
        })
        .collect();
    let requests = Arc::new(requests);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients.max(1))
        .map(|worker| {
            let requests = requests.clone();
            let url = format!("{url}/v1/embed");
            let clients = args.clients.max(1);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let client = reqwest::blocking::Client::new();
                for body in requests.iter().skip(worker).step_by(clients) {
                    crate::cli::import::post_with_retry(&client, &url, body)?;
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("benchmark client panicked"))??;
    }
    let http = n as f64 / started.elapsed().as_secs_f64();
    runtime.block_on(server.stop())?;
    let _ = std::fs::remove_dir_all(&data_dir);

    println!(
        "\nEmbedding throughput ({} images, model {}, device {})",
        n, spec.name, args.device
    );
    println!("| path | images/s | relative |");
    println!("|---|---:|---:|");
    println!("| model directly (batches of {batch}) | {direct:.0} | 1.00 |");
    println!(
        "| HTTP /v1/embed ({} clients × {} images/request) | {http:.0} | {:.2} |",
        args.clients,
        args.request_size,
        http / direct
    );
    Ok(())
}

fn wait_ready(url: &str) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{url}/readyz")).send() {
            if response.status().is_success() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("server at {url} did not become ready")
}

/// Per-coordinate standard deviation of the noise around a cluster centre: about 0.7 in
/// norm at dimension 128, so clusters overlap like the classes of a real gallery.
const NOISE: f32 = 0.06;

/// Unit vectors around `centres` random cluster centres, like the embeddings of a real
/// gallery (uniformly random vectors have no neighbourhood structure worth indexing).
fn clustered_vectors(rng: &mut StdRng, count: usize, centres: &[Vec<f32>]) -> Vec<Vec<f32>> {
    (0..count)
        .map(|_| {
            let centre = &centres[rng.gen_range(0..centres.len())];
            let v: Vec<f32> = centre.iter().map(|c| c + NOISE * gaussian(rng)).collect();
            unit(v)
        })
        .collect()
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let (u1, u2): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.into_iter().map(|x| x / norm).collect()
}

fn search_benchmark(args: &BenchArgs) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let centres: Vec<Vec<f32>> = (0..1000)
        .map(|_| unit((0..args.dim).map(|_| gaussian(&mut rng)).collect()))
        .collect();
    let vectors = clustered_vectors(&mut rng, args.vectors, &centres);
    let queries = clustered_vectors(&mut rng, args.queries, &centres);
    let config = Config::load(None, Vec::new())?;
    let params = IndexParams {
        max_elements: args.vectors,
        ..config.index.clone()
    };
    let index = VectorIndex::new(args.dim, params.clone());
    let started = Instant::now();
    let keys: Vec<String> = (0..vectors.len()).map(|i| i.to_string()).collect();
    for (keys, vectors) in keys.chunks(10_000).zip(vectors.chunks(10_000)) {
        let batch: Vec<_> = keys
            .iter()
            .zip(vectors)
            .map(|(k, v)| (k.as_str(), None, v.as_slice()))
            .collect();
        index.upsert_batch(&batch)?;
    }
    let build_seconds = started.elapsed().as_secs_f64();
    let k = 10;
    let started = Instant::now();
    let exact: Vec<Vec<String>> = queries
        .iter()
        .map(|q| {
            Ok(index
                .exact_search(q, k, None)?
                .into_iter()
                .map(|h| h.key)
                .collect())
        })
        .collect::<anyhow::Result<_>>()?;
    let exact_qps = queries.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let approximate: Vec<Vec<String>> = queries
        .iter()
        .map(|q| {
            Ok(index
                .search(q, k, None, None)?
                .into_iter()
                .map(|h| h.key)
                .collect())
        })
        .collect::<anyhow::Result<_>>()?;
    let hnsw_qps = queries.len() as f64 / started.elapsed().as_secs_f64();
    let found: usize = approximate
        .iter()
        .zip(&exact)
        .map(|(a, e)| a.iter().filter(|key| e.contains(key)).count())
        .sum();
    // Exact search returns fewer than k hits when there are fewer than k vectors.
    let wanted: usize = exact.iter().map(Vec::len).sum();
    let recall = found as f64 / wanted.max(1) as f64;

    println!(
        "\nSearch ({} clustered unit vectors, dim {}, {} queries, k = {k}, M = {}, ef_construction = {}, ef_search = {}; build {build_seconds:.1} s)",
        args.vectors, args.dim, args.queries, params.m, params.ef_construction, params.ef_search
    );
    println!("| method | queries/s | recall@10 | speed-up |");
    println!("|---|---:|---:|---:|");
    println!("| exact brute force | {exact_qps:.0} | 1.000 | 1.0× |");
    println!(
        "| HNSW | {hnsw_qps:.0} | {recall:.3} | {:.1}× |",
        hnsw_qps / exact_qps
    );
    Ok(())
}
