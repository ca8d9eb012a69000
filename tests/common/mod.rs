//! Test harness: runs the real `crossbatch serve` binary on a free port with a temporary
//! data dir, and talks to it over real HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// Fashion-MNIST test split, installed by `scripts/setup.sh`.
pub const FMNIST_IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
/// Labels of [`FMNIST_IMAGES`].
pub const FMNIST_LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

/// Device the test servers run on, as the server reports it (`cpu`, `cuda:N`):
/// `CROSSBATCH_TEST_DEVICE` (`cpu` when unset; `auto`, `cuda`, `cuda:N` on a GPU machine, see
/// `scripts/device_check.sh`).
pub fn test_device() -> String {
    let wanted = std::env::var("CROSSBATCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_owned());
    let device = crossbatch::model::parse_device(&wanted).expect("CROSSBATCH_TEST_DEVICE");
    crossbatch::embed::batcher::device_name(device)
}

/// A running server process.
pub struct Server {
    child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    client: reqwest::blocking::Client,
}

impl Server {
    /// Starts `crossbatch serve` on the shipped default model, [`test_device`], port 0, and waits until
    /// `/readyz` is 200. `env` adds `CROSSBATCH__…` overrides.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let server = Server::spawn(data_dir, env);
        server.wait_ready();
        server
    }

    /// [`Server::start`] on the model in `model_dir` instead of the shipped one.
    pub fn start_on_model(data_dir: &Path, model_dir: &Path, env: &[(&str, &str)]) -> Server {
        let server = Server::spawn_on_model(data_dir, model_dir, env);
        server.wait_ready();
        server
    }

    /// Starts the process and returns once the port is bound (possibly not ready yet).
    pub fn spawn(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        Server::spawn_on_model(data_dir, &shipped, env)
    }

    fn spawn_on_model(data_dir: &Path, model_dir: &Path, env: &[(&str, &str)]) -> Server {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut command = Command::new(env!("CARGO_BIN_EXE_crossbatch"));
        command
            .current_dir(root)
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--device",
                &test_device(),
                "--model",
            ])
            .arg(model_dir)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .env("CROSSBATCH__MODEL__THREADS", "1")
            // Tests that exercise the online trainer turn it back on.
            .env("CROSSBATCH__TRAINER__ENABLED", "false")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start crossbatch serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .expect("read stdout");
            if let Some(rest) = line.strip_prefix("crossbatch listening on ") {
                break rest.trim().to_string();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client"),
        }
    }

    /// Polls `/readyz` until 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(response) = self.client.get(format!("{}/readyz", self.url)).send() {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the process (no graceful shutdown) and waits for it to die.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Sends SIGTERM (a graceful shutdown) and waits for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(signalled.success(), "kill -TERM failed");
        self.child.wait().expect("wait")
    }

    /// GET; returns status and parsed JSON (or `Value::Null` for a non-JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET");
        decode(response)
    }

    /// GET returning the body as text.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .expect("GET");
        (response.status().as_u16(), response.text().expect("body"))
    }

    /// POST a JSON value.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .expect("POST");
        decode(response)
    }

    /// POST raw bytes as `application/json`.
    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("POST");
        decode(response)
    }

    /// DELETE.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .delete(format!("{}{path}", self.url))
            .send()
            .expect("DELETE");
        decode(response)
    }

    /// Number of stored items per `/v1/info`.
    pub fn item_count(&self) -> u64 {
        let (status, info) = self.get("/v1/info");
        assert_eq!(status, 200, "{info}");
        info["items"].as_u64().expect("items")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn decode(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One Fashion-MNIST test image as base64 PNG with its label.
#[derive(Clone)]
pub struct TestImage {
    /// Base64 PNG.
    pub png: String,
    /// Class label as text ("0" … "9").
    pub label: String,
}

/// The first `n` Fashion-MNIST test images (decoded once per test binary).
pub fn fashion_images(n: usize) -> Vec<TestImage> {
    static ALL: OnceLock<Vec<TestImage>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let dataset = crossbatch::data::load(&crossbatch::data::DatasetArgs {
            format: crossbatch::data::DatasetFormat::Idx,
            labels: Some(FMNIST_LABELS.into()),
            limit: Some(1000),
            path: FMNIST_IMAGES.into(),
        })
        .expect("Fashion-MNIST (run scripts/setup.sh)");
        dataset
            .samples
            .iter()
            .map(|s| {
                let mut png = std::io::Cursor::new(Vec::new());
                s.image
                    .write_to(&mut png, image::ImageFormat::Png)
                    .expect("png");
                TestImage {
                    png: base64::engine::general_purpose::STANDARD.encode(png.into_inner()),
                    label: s.label.clone(),
                }
            })
            .collect()
    });
    assert!(n <= all.len());
    all[..n].to_vec()
}

/// Upserts images as items `{prefix}{i}` in batches of 50; panics on any non-200.
pub fn upsert_images(server: &Server, prefix: &str, images: &[TestImage]) {
    for (batch_index, batch) in images.chunks(50).enumerate() {
        let items: Vec<Value> = batch
            .iter()
            .enumerate()
            .map(|(offset, image)| {
                json!({
                    "id": format!("{prefix}{}", batch_index * 50 + offset),
                    "label": image.label,
                    "image": image.png,
                    "metadata": { "position": batch_index * 50 + offset },
                })
            })
            .collect();
        let (status, body) = server.post("/v1/items", &json!({ "items": items }));
        assert_eq!(status, 200, "{body}");
    }
}
