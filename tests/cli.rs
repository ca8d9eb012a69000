//! The command-line tools against a real server: `import` loads a dataset through the API,
//! `eval --server` and `eval --model` agree on the same data, `train` writes a usable model.
mod common;

use std::path::Path;
use std::process::Command;

use common::{fashion_images, upsert_images, Server, FMNIST_IMAGES, FMNIST_LABELS};
use serde_json::{json, Value};

/// Runs crossbatch, asserts success, returns its stdout and stderr.
fn crossbatch(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_crossbatch"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("run crossbatch");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "crossbatch {args:?} failed: {stderr}"
    );
    (stdout, stderr)
}

/// The arguments of `crossbatch train` on the first `limit` Fashion-MNIST test images for
/// `steps` steps on the CPU into `out`, with `options` added.
fn train_args<'a>(
    out: &'a Path,
    limit: &'a str,
    steps: &'a str,
    options: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        limit,
        "--steps",
        steps,
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(options);
    args.push(FMNIST_IMAGES);
    args
}

/// Runs [`train_args`], asserts success, returns its stdout and stderr.
fn train(out: &Path, limit: &str, steps: &str, options: &[&str]) -> (String, String) {
    crossbatch(&train_args(out, limit, steps, options))
}

#[test]
fn import_then_eval_through_the_server_matches_offline_eval() {
    let dir = tempfile::tempdir().unwrap();
    // A server that takes fewer inputs per request than the default --batch-size of 64:
    // import and eval lower their batches to its limit.
    let server = Server::start(
        dir.path(),
        &[("CROSSBATCH__BATCHING__MAX_INPUTS_PER_REQUEST", "48")],
    );
    let data = [
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        "400",
        FMNIST_IMAGES,
    ];
    let mut import = vec!["import", "--server", &server.url];
    import.extend(data);
    crossbatch(&import);
    assert_eq!(server.item_count(), 400);
    let (_, item) = server.get("/v1/items/t10k-images-idx3-ubyte-0");
    assert!(
        item["label"].is_string(),
        "import names items after the file: {item}"
    );

    let mut online = vec!["eval", "--json", "--server", &server.url];
    online.extend(data);
    let online: Value = serde_json::from_str(&crossbatch(&online).0).unwrap();
    let mut offline = vec![
        "eval",
        "--json",
        "--device",
        "cpu",
        "--model",
        "models/default",
    ];
    offline.extend(data);
    let offline: Value = serde_json::from_str(&crossbatch(&offline).0).unwrap();
    assert_eq!(online["n"], 400);
    for k in ["1", "2", "4", "8"] {
        let (a, b) = (
            online["recall_at"][k].as_f64().unwrap(),
            offline["recall_at"][k].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-9,
            "Recall@{k}: server {a} vs offline {b}"
        );
    }
    let r1 = offline["recall_at"]["1"].as_f64().unwrap();
    assert!(
        r1 > 0.7,
        "the shipped model retrieves Fashion-MNIST well: R@1 = {r1}"
    );
    assert!(offline["map_at_r"].as_f64().unwrap() > 0.0);
}

#[test]
fn train_writes_a_model_eval_loads_and_fine_tunes_with_every_objective_switch() {
    let out = tempfile::tempdir().unwrap();
    let model_dir = out.path().join("model");
    // Flags that could never train, or would train a model no server loads, are refused
    // before anything is read or written.
    for bad in [
        &["--per-class", "1"][..],
        &["--batch-size", "0"],
        &["--lr", "nan"],
        &["--embedding-dim", "70000"],
    ] {
        let refused = Command::new(env!("CARGO_BIN_EXE_crossbatch"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(train_args(&model_dir, "500", "3", bad))
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{bad:?} was accepted");
        assert!(!model_dir.exists(), "{bad:?} wrote a model");
    }
    train(&model_dir, "500", "3", &["--batch-size", "32"]);
    assert!(model_dir.join("model.toml").exists());
    let report = eval_model(&model_dir, "100");
    assert_eq!(report["n"], 100);

    // Fine-tuning with every objective switch: multi-similarity, XBM, GradCache, frozen BN.
    let tuned_dir = out.path().join("tuned");
    let (stdout, stderr) = train(
        &tuned_dir,
        "300",
        "3",
        &[
            "--batch-size",
            "40",
            "--per-class",
            "4",
            "--init",
            "models/default",
            "--loss",
            "multi-similarity",
            "--memory-size",
            "64",
            "--memory-start",
            "1",
            "--gradcache-chunk",
            "16",
            "--norm",
            "frozen",
        ],
    );
    assert_trained(&tuned_dir, &(stdout + &stderr));
    // The cross-iteration norms, with the contrastive loss and an aged memory.
    for norm in ["cbn", "naive"] {
        let dir = out.path().join(norm);
        let (stdout, stderr) = train(
            &dir,
            "300",
            "3",
            &[
                "--batch-size",
                "8",
                "--per-class",
                "2",
                "--init",
                "models/default",
                "--loss",
                "contrastive",
                "--memory-size",
                "32",
                "--memory-max-age",
                "2",
                "--norm",
                norm,
                "--cbn-window",
                "2",
                "--cbn-burnin",
                "1",
            ],
        );
        assert_trained(&dir, &(stdout + &stderr));
    }
    // GradCache with batch or cross-iteration statistics is refused with a clear message.
    for norm in ["bn", "cbn", "naive"] {
        let refused = Command::new(env!("CARGO_BIN_EXE_crossbatch"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(train_args(
                &tuned_dir,
                "100",
                "1",
                &["--gradcache-chunk", "16", "--norm", norm],
            ))
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{norm}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("--norm frozen"), "{norm}: {stderr}");
    }
}

/// `crossbatch eval --json` of the model in `model_dir` on the first `limit` Fashion-MNIST
/// test images.
fn eval_model(model_dir: &Path, limit: &str) -> Value {
    let output = crossbatch(&[
        "eval",
        "--json",
        "--device",
        "cpu",
        "--model",
        model_dir.to_str().unwrap(),
        "--labels",
        FMNIST_LABELS,
        "--limit",
        limit,
        FMNIST_IMAGES,
    ]);
    serde_json::from_str(&output.0).unwrap()
}

/// `train` took its 3 steps with a finite loss, and the model it wrote loads and evaluates.
fn assert_trained(model_dir: &Path, log: &str) {
    assert!(log.contains("trained 3 steps"), "{log}");
    let losses = log
        .split("(loss ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no loss in {log}"));
    assert!(
        losses
            .split(" → ")
            .all(|l| l.parse::<f64>().is_ok_and(f64::is_finite)),
        "{losses}"
    );
    let report = eval_model(model_dir, "50");
    assert!(
        report["recall_at"]["1"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
}

#[test]
fn a_new_base_model_that_cannot_take_some_stored_items_leaves_them_out_and_starts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    upsert_images(&server, "img", &fashion_images(10));
    // A tensor item fits only a 1×28×28 input.
    let (status, body) = server.post(
        "/v1/items",
        &json!({ "items": [{ "id": "tensor", "tensor": vec![0.1f32; 28 * 28], "shape": [1, 28, 28] }] }),
    );
    assert_eq!(status, 200, "{body}");
    server.kill();

    let out = tempfile::tempdir().unwrap();
    let small = out.path().join("small");
    train(
        &small,
        "200",
        "1",
        &["--batch-size", "32", "--image-size", "16"],
    );
    // Start-up re-embeds the gallery with the new 16×16 model: the images are resized, the
    // tensor item cannot be, and it stays stored but out of the index instead of failing
    // start-up.
    let server = Server::start_on_model(dir.path(), &small, &[]);
    let (_, info) = server.get("/v1/info");
    assert_eq!(info["input"]["height"], 16, "{info}");
    assert_eq!(server.item_count(), 11);
    assert_eq!(info["index_items"], 10, "{info}");
    assert_eq!(server.get("/v1/items/tensor").0, 200);
    let (status, _) = server.post(
        "/v1/search",
        &json!({ "query": { "item_id": "tensor" }, "k": 3 }),
    );
    assert_eq!(status, 404, "the tensor item is not in this model's index");
    let (status, found) = server.post(
        "/v1/search",
        &json!({ "query": { "item_id": "img3" }, "k": 1 }),
    );
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["results"][0]["id"], "img3");
}

#[test]
fn a_base_model_that_fails_to_load_does_not_become_active() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    upsert_images(&server, "img", &fashion_images(5));
    server.kill();

    // The shipped model with its weights cut short: its spec reads, its weights do not load.
    let broken = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    std::fs::copy(shipped.join("model.toml"), broken.path().join("model.toml")).unwrap();
    let weights = std::fs::read(shipped.join("model.safetensors")).unwrap();
    std::fs::write(
        broken.path().join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_crossbatch"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--model",
        ])
        .arg(broken.path())
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .env("CROSSBATCH__TRAINER__ENABLED", "false")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            panic!("a server whose model cannot load kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");

    // Back on the shipped model: the first generation is still the active one, and the
    // broken model left no generation behind.
    let server = Server::start(dir.path(), &[]);
    let (_, models) = server.get("/v1/models");
    assert_eq!(models["active"], 1, "{models}");
    assert_eq!(
        models["generations"].as_array().unwrap().len(),
        1,
        "{models}"
    );
    assert_eq!(server.item_count(), 5);
}

/// A redeploy that moves the unchanged base model: the data directory starts on the same
/// generation, served from the model's new place (before, the start failed on the old path).
#[test]
fn a_moved_base_model_is_served_from_its_new_place() {
    let data = tempfile::tempdir().unwrap();
    let before = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let model = before.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for file in ["model.toml", "model.safetensors"] {
        std::fs::copy(shipped.join(file), model.join(file)).unwrap();
    }
    let server = Server::start_on_model(data.path(), &model, &[]);
    upsert_images(&server, "img", &fashion_images(5));
    let version = server.get("/v1/info").1["model_version"].clone();
    server.kill();

    let after = tempfile::tempdir().unwrap();
    let moved = after.path().join("model");
    std::fs::rename(&model, &moved).unwrap();
    let server = Server::start_on_model(data.path(), &moved, &[]);
    assert_eq!(server.get("/v1/info").1["model_version"], version);
    let (_, models) = server.get("/v1/models");
    let generations = models["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 1, "no new generation: {models}");
    let recorded = std::fs::canonicalize(&moved).unwrap();
    assert_eq!(
        generations[0]["model_dir"],
        recorded.display().to_string(),
        "{models}"
    );
    let (status, found) = server.post(
        "/v1/search",
        &json!({ "query": { "item_id": "img3" }, "k": 1 }),
    );
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["results"][0]["id"], "img3");
}

/// A TCP proxy to `target` (`http://host:port`) that cuts its first connection once
/// `cut_after` bytes have gone from the client to the server, as a restarting server or a
/// broken network would, and forwards every later connection whole. Returns its URL.
fn proxy_cutting_its_first_connection(target: &str, cut_after: usize) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let target = target.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        for (n, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&target).unwrap();
            let (mut from_server, mut to_client) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
            let (mut from_client, mut to_server) = (client, server);
            let limit = if n == 0 { cut_after } else { usize::MAX };
            std::thread::spawn(move || {
                let (mut buffer, mut sent) = (vec![0u8; 16 * 1024], 0usize);
                while sent < limit {
                    let Ok(read) = from_client.read(&mut buffer) else {
                        break;
                    };
                    if read == 0 || to_server.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                    sent += read;
                }
                let _ = from_client.shutdown(Shutdown::Both);
                let _ = to_server.shutdown(Shutdown::Both);
            });
        }
    });
    url
}

/// An import whose connection breaks midway (a server restarting, a network failing) sends
/// the broken request again and stores everything.
#[test]
fn an_import_survives_a_connection_cut_midway() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let proxy = proxy_cutting_its_first_connection(&server.url, 100_000);
    let (_, stderr) = crossbatch(&[
        "import",
        "--server",
        &proxy,
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        "300",
        "--batch-size",
        "50",
        FMNIST_IMAGES,
    ]);
    assert!(
        stderr.contains("retrying"),
        "the cut was not seen: {stderr}"
    );
    assert_eq!(server.item_count(), 300);
}
