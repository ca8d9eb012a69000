//! End-to-end tests of the HTTP API on the real server binary, the shipped default model and
//! real Fashion-MNIST images.
mod common;

use base64::Engine;
use common::{fashion_images, upsert_images, Server};
use crossbatch::embed::preprocess::image_to_input;
use crossbatch::model::spec::InputSpec;
use serde_json::{json, Value};

fn search_image(server: &Server, png: &str, k: usize) -> Vec<Value> {
    let (status, body) = server.post("/v1/search", &json!({ "query": { "image": png }, "k": k }));
    assert_eq!(status, 200, "{body}");
    body["results"].as_array().expect("results").clone()
}

/// Asserts the item is the best match for its own image (or tied with an identical image).
fn assert_finds_itself(results: &[Value], id: &str) {
    let top = &results[0];
    if top["id"] != id {
        let own = results.iter().find(|r| r["id"] == id);
        let own = own.unwrap_or_else(|| panic!("{id} not among results {results:?}"));
        let gap = top["score"].as_f64().unwrap() - own["score"].as_f64().unwrap();
        assert!(gap.abs() < 1e-5, "{id} not at rank 1: {results:?}");
    }
}

#[test]
fn every_indexed_image_finds_itself_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(300);
    let server = Server::start(dir.path(), &[]);
    upsert_images(&server, "fm-", &images);
    assert_eq!(server.item_count(), 300);
    let mut before = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let results = search_image(&server, &image.png, 5);
        assert_finds_itself(&results, &format!("fm-{i}"));
        before.push(results);
    }
    // Label and metadata come back with results.
    let first = &before[0][0];
    assert!(
        first["label"].is_string() && first["metadata"]["position"].is_u64(),
        "{first}"
    );

    server.kill();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(
        server.item_count(),
        300,
        "acknowledged writes survive SIGKILL"
    );
    for (i, image) in images.iter().enumerate().step_by(7) {
        let after = search_image(&server, &image.png, 5);
        let ids = |r: &[Value]| r.iter().map(|x| x["id"].clone()).collect::<Vec<_>>();
        assert_eq!(ids(&after), ids(&before[i]), "same results after restart");
    }
}

#[test]
fn search_by_vector_item_and_batch_with_label_filter() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(100);
    let server = Server::start(dir.path(), &[]);
    upsert_images(&server, "x", &images);

    let (status, item) = server.get("/v1/items/x3");
    assert_eq!(status, 200, "{item}");
    let embedding = item["embedding"].clone();
    assert_eq!(item["label"], images[3].label.as_str());

    let (status, by_vector) = server.post(
        "/v1/search",
        &json!({ "query": { "vector": embedding }, "k": 3 }),
    );
    assert_eq!(status, 200, "{by_vector}");
    assert_eq!(by_vector["results"][0]["id"], "x3");
    let (status, by_item) = server.post(
        "/v1/search",
        &json!({ "query": { "item_id": "x3" }, "k": 3 }),
    );
    assert_eq!(status, 200);
    assert_eq!(by_item["results"], by_vector["results"]);

    let label = images[0].label.clone();
    let same_label = images.iter().filter(|i| i.label == label).count();
    let (status, filtered) = server.post(
        "/v1/search",
        &json!({ "queries": [{ "image": images[1].png }, { "item_id": "x0" }], "k": 100, "filter": { "label": label } }),
    );
    assert_eq!(status, 200, "{filtered}");
    let batches = filtered["results"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    for results in batches {
        let results = results.as_array().unwrap();
        assert_eq!(
            results.len(),
            same_label,
            "every item of the label, and only those"
        );
        assert!(results.iter().all(|r| r["label"] == label.as_str()));
        let scores: Vec<f64> = results
            .iter()
            .map(|r| r["score"].as_f64().unwrap())
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score");
    }
}

/// The largest difference between two JSON embeddings of equal length.
fn max_abs_diff(a: &Value, b: &Value) -> f64 {
    a.as_array()
        .unwrap()
        .iter()
        .zip(b.as_array().unwrap())
        .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

#[test]
fn embed_images_and_tensors_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(3);
    let server = Server::start(dir.path(), &[]);
    let (status, info) = server.get("/v1/info");
    assert_eq!(status, 200);
    let dim = info["embedding_dim"].as_u64().unwrap() as usize;
    let input = &info["input"];
    let (c, h, w) = (
        input["channels"].as_u64().unwrap(),
        input["height"].as_u64().unwrap(),
        input["width"].as_u64().unwrap(),
    );

    let inputs: Vec<Value> = images.iter().map(|i| json!({ "image": i.png })).collect();
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": inputs }));
    assert_eq!(status, 200, "{body}");
    let embeddings = body["embeddings"].as_array().unwrap();
    assert_eq!(embeddings.len(), 3);
    for e in embeddings {
        let v: Vec<f64> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), dim);
        let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit norm, got {norm}");
    }
    // One image embedded alone equals the same image embedded in a batch.
    let (_, alone) = server.post("/v1/embed", &json!({ "inputs": [inputs[1]] }));
    let diff = max_abs_diff(&alone["embeddings"][0], &embeddings[1]);
    assert!(diff < 1e-4, "batching changes the embedding by {diff}");

    // The image preprocessed here into a tensor embeds exactly as the image itself.
    let spec: InputSpec = serde_json::from_value(input.clone()).unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(&images[1].png)
        .unwrap();
    let tensor = image_to_input(&image::load_from_memory(&png).unwrap(), &spec);
    assert_eq!(tensor.len(), (c * h * w) as usize);
    let (status, body) = server.post(
        "/v1/embed",
        &json!({ "inputs": [{ "tensor": tensor, "shape": [c, h, w] }] }),
    );
    assert_eq!(status, 200, "{body}");
    let diff = max_abs_diff(&body["embeddings"][0], &embeddings[1]);
    assert!(diff < 1e-4, "tensor and image inputs differ by {diff}");
    assert!(body["model_version"].as_u64().unwrap() >= 1);
}

#[test]
fn delete_and_upsert_replace_items() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(20);
    let server = Server::start(dir.path(), &[]);
    upsert_images(&server, "d", &images[..10]);

    let (status, _) = server.delete("/v1/items/d4");
    assert_eq!(status, 200);
    let (status, body) = server.get("/v1/items/d4");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = server.delete("/v1/items/d4");
    assert_eq!(status, 404, "second delete is a 404");
    let results = search_image(&server, &images[4].png, 9);
    assert!(
        results.iter().all(|r| r["id"] != "d4"),
        "deleted item never returned"
    );
    assert_eq!(results.len(), 9);
    assert_eq!(server.item_count(), 9);

    // Upsert d5 with another image, label and metadata: the old version disappears.
    let (status, body) = server.post(
        "/v1/items",
        &json!({ "items": [{ "id": "d5", "label": "replaced", "image": images[15].png, "metadata": { "v": 2 } }] }),
    );
    assert_eq!(status, 200, "{body}");
    let (_, item) = server.get("/v1/items/d5");
    assert_eq!(item["label"], "replaced");
    assert_eq!(item["metadata"]["v"], 2);
    assert_eq!(server.item_count(), 9);
    let results = search_image(&server, &images[15].png, 9);
    assert_eq!(results[0]["id"], "d5");
    assert_eq!(
        results.iter().filter(|r| r["id"] == "d5").count(),
        1,
        "no duplicate point"
    );
    let old = search_image(&server, &images[5].png, 1);
    assert_ne!(old[0]["id"], "d5", "old image no longer matches d5 exactly");
}

#[test]
fn health_readiness_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.get("/healthz").0, 200);
    let (status, ready) = server.get("/readyz");
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    let (status, info) = server.get("/v1/info");
    assert_eq!(status, 200);
    assert_eq!(info["model"]["name"], "fashion-mnist-resnet-small");
    assert_eq!(info["device"], common::test_device());
    assert_eq!(info["items"], 0);
    assert_eq!(info["input"]["channels"], 1);
}
