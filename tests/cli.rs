//! The command-line tools against a real server: `import` loads a dataset through the API,
//! `eval --server` and `eval --model` agree on the same data, `train` writes a usable model.
mod common;

use std::process::Command;

use common::{Server, FMNIST_IMAGES, FMNIST_LABELS};
use serde_json::Value;

fn crossbatch(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_crossbatch"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("run crossbatch");
    assert!(
        output.status.success(),
        "crossbatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[test]
fn import_then_eval_through_the_server_matches_offline_eval() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let data = [
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        "400",
        FMNIST_IMAGES,
    ];
    let mut import = vec!["import", "--server", &server.url, "--batch-size", "64"];
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
    let online: Value = serde_json::from_str(&crossbatch(&online)).unwrap();
    let mut offline = vec![
        "eval",
        "--json",
        "--device",
        "cpu",
        "--model",
        "models/default",
    ];
    offline.extend(data);
    let offline: Value = serde_json::from_str(&crossbatch(&offline)).unwrap();
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
fn train_writes_a_model_the_server_can_load() {
    let out = tempfile::tempdir().unwrap();
    let model_dir = out.path().join("model");
    let model = model_dir.to_str().unwrap();
    crossbatch(&[
        "train",
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        "500",
        "--steps",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--out",
        model,
        FMNIST_IMAGES,
    ]);
    assert!(model_dir.join("model.toml").exists());
    let report: Value = serde_json::from_str(&crossbatch(&[
        "eval",
        "--json",
        "--device",
        "cpu",
        "--model",
        model,
        "--format",
        "idx",
        "--labels",
        FMNIST_LABELS,
        "--limit",
        "100",
        FMNIST_IMAGES,
    ]))
    .unwrap();
    assert_eq!(report["n"], 100);
}
