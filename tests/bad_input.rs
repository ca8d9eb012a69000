//! Every kind of bad input gets a 4xx JSON error with a clear code and changes nothing.
mod common;

use common::{fashion_images, upsert_images, Server};
use serde_json::{json, Value};

/// A snapshot of what the store and index hold, to prove a bad request changed nothing.
fn snapshot(server: &Server) -> (u64, Value, Value) {
    let (_, item) = server.get("/v1/items/ok0");
    let (_, search) = server.post(
        "/v1/search",
        &json!({ "query": { "item_id": "ok0" }, "k": 5 }),
    );
    (server.item_count(), item, search["results"].clone())
}

#[test]
fn bad_inputs_get_4xx_with_a_code_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(6);
    let server = Server::start(
        dir.path(),
        &[
            ("CROSSBATCH__SERVER__BODY_LIMIT_BYTES", "200000"),
            ("CROSSBATCH__SEARCH__MAX_K", "50"),
        ],
    );
    upsert_images(&server, "ok", &images);
    let before = snapshot(&server);
    let png = images[0].png.clone();
    let (_, info) = server.get("/v1/info");
    let dim = info["embedding_dim"].as_u64().unwrap() as usize;
    let not_an_image = base64_of(b"definitely not a PNG file");
    // A real PNG, a few bytes compressed, one pixel past the side limit.
    let wide_png = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(4097, 1)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        base64_of(&png.into_inner())
    };
    let truncated_png = {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&png)
            .unwrap();
        base64_of(&raw[..raw.len() / 2])
    };

    // Finite values so large that the model's activations overflow: the embedding is NaN.
    let numel = ["channels", "height", "width"]
        .iter()
        .map(|key| info["input"][key].as_u64().unwrap() as usize)
        .product::<usize>();
    let overflowing = json!({
        "tensor": vec![3.0e38f32; numel],
        "shape": [info["input"]["channels"], info["input"]["height"], info["input"]["width"]],
    });
    let with_id = |id: &str, input: &Value| {
        let mut fields = input.clone();
        fields["id"] = json!(id);
        fields
    };

    let item = |fields: Value| json!({ "items": [fields] });
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "items: bad base64",
            "/v1/items",
            item(json!({ "id": "n1", "image": "@@not base64@@" })),
            400,
            "invalid_base64",
        ),
        (
            "items: not an image",
            "/v1/items",
            item(json!({ "id": "n1", "image": not_an_image })),
            422,
            "invalid_image",
        ),
        (
            "items: truncated png",
            "/v1/items",
            item(json!({ "id": "n1", "image": truncated_png })),
            422,
            "invalid_image",
        ),
        (
            "items: wrong tensor shape",
            "/v1/items",
            item(json!({ "id": "n1", "tensor": [0.0, 1.0], "shape": [1, 1, 2] })),
            422,
            "invalid_tensor",
        ),
        (
            "items: tensor without shape",
            "/v1/items",
            item(json!({ "id": "n1", "tensor": [0.0] })),
            422,
            "invalid_tensor",
        ),
        (
            "items: no input",
            "/v1/items",
            item(json!({ "id": "n1" })),
            400,
            "invalid_input",
        ),
        (
            "items: image and tensor",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "tensor": [0.0], "shape": [1] })),
            400,
            "invalid_input",
        ),
        (
            "items: empty id",
            "/v1/items",
            item(json!({ "id": "", "image": png })),
            422,
            "invalid_id",
        ),
        (
            "items: empty label",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "label": " " })),
            422,
            "invalid_label",
        ),
        (
            "items: label too long",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "label": "x".repeat(257) })),
            422,
            "invalid_label",
        ),
        (
            "items: label with a control character",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "label": "a\u{7}b" })),
            422,
            "invalid_label",
        ),
        (
            "items: metadata not an object",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "metadata": [1, 2] })),
            422,
            "invalid_metadata",
        ),
        (
            "items: duplicate ids",
            "/v1/items",
            json!({ "items": [{ "id": "ok0", "image": png }, { "id": "ok0", "image": png }] }),
            422,
            "duplicate_id",
        ),
        (
            "items: unknown field",
            "/v1/items",
            item(json!({ "id": "n1", "image": png, "colour": "red" })),
            400,
            "invalid_json",
        ),
        (
            "items: empty list",
            "/v1/items",
            json!({ "items": [] }),
            400,
            "empty_request",
        ),
        (
            "items: one good one bad",
            "/v1/items",
            json!({ "items": [{ "id": "n2", "image": png }, { "id": "n3", "image": not_an_image }] }),
            422,
            "invalid_image",
        ),
        (
            "search: k = 0",
            "/v1/search",
            json!({ "query": { "image": png }, "k": 0 }),
            422,
            "invalid_k",
        ),
        (
            "search: k huge",
            "/v1/search",
            json!({ "query": { "image": png }, "k": 1_000_000 }),
            422,
            "invalid_k",
        ),
        (
            "search: wrong dimension",
            "/v1/search",
            json!({ "query": { "vector": [1.0, 0.0] } }),
            422,
            "wrong_dimension",
        ),
        (
            "search: zero vector",
            "/v1/search",
            json!({ "query": { "vector": vec![0.0; dim] } }),
            422,
            "invalid_vector",
        ),
        (
            "search: unknown item",
            "/v1/search",
            json!({ "query": { "item_id": "nope" } }),
            404,
            "not_found",
        ),
        (
            "search: two query kinds",
            "/v1/search",
            json!({ "query": { "image": png, "item_id": "ok0" } }),
            400,
            "invalid_query",
        ),
        (
            "search: no query",
            "/v1/search",
            json!({ "k": 3 }),
            400,
            "invalid_query",
        ),
        (
            "search: ef = 0",
            "/v1/search",
            json!({ "query": { "item_id": "ok0" }, "ef": 0 }),
            422,
            "invalid_ef",
        ),
        (
            "search: ef above its limit",
            "/v1/search",
            json!({ "query": { "item_id": "ok0" }, "ef": 10_001 }),
            422,
            "invalid_ef",
        ),
        (
            "embed: an image wider than 4096 px",
            "/v1/embed",
            json!({ "inputs": [{ "image": wide_png }] }),
            422,
            "invalid_image",
        ),
        (
            "embed: not an image",
            "/v1/embed",
            json!({ "inputs": [{ "image": not_an_image }] }),
            422,
            "invalid_image",
        ),
        (
            "items: input the model maps to a non-finite vector",
            "/v1/items",
            item(with_id("n1", &overflowing)),
            422,
            "degenerate_embedding",
        ),
        (
            "embed: input the model maps to a non-finite vector",
            "/v1/embed",
            json!({ "inputs": [overflowing] }),
            422,
            "degenerate_embedding",
        ),
        (
            "search: query the model maps to a non-finite vector",
            "/v1/search",
            json!({ "query": overflowing }),
            422,
            "degenerate_embedding",
        ),
        (
            "activate: a version that is not a number",
            "/v1/models/latest/activate",
            json!({}),
            404,
            "not_found",
        ),
        (
            "embed: not a list",
            "/v1/embed",
            json!({ "inputs": 5 }),
            400,
            "invalid_json",
        ),
    ];
    for (name, path, body, status, code) in cases {
        let (got_status, got) = server.post(path, &body);
        assert_eq!(got_status, status, "{name}: {got}");
        assert_eq!(got["error"]["code"], code, "{name}: {got}");
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {got}"
        );
        assert_eq!(snapshot(&server), before, "{name} changed state");
    }

    // Malformed JSON and an over-limit body.
    let (status, got) = server.post_raw("/v1/items", b"{\"items\": [".to_vec());
    assert_eq!(
        (status, got["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{got}"
    );
    let huge = json!({ "items": [{ "id": "big", "image": "A".repeat(300_000) }] });
    let (status, got) = server.post("/v1/items", &huge);
    assert_eq!(
        (status, got["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{got}"
    );
    // The trainer's routes without a trainer; activating what is already live.
    for (status, got) in [
        server.get("/v1/trainer"),
        server.post("/v1/trainer/pause", &json!({})),
    ] {
        assert_eq!(
            (status, got["error"]["code"].as_str()),
            (409, Some("trainer_disabled")),
            "{got}"
        );
    }
    let live = info["model_version"].as_u64().unwrap();
    let (status, got) = server.post(&format!("/v1/models/{live}/activate"), &json!({}));
    assert_eq!(
        (status, &got),
        (200, &json!({ "active": live, "building": null }))
    );
    // Path parameters that are not UTF-8 once percent-decoded get the JSON envelope too.
    for (status, got) in [
        server.get("/v1/items/%FF"),
        server.delete("/v1/items/%FF"),
        server.delete("/v1/classes/%C3%28"),
        server.post("/v1/models/%FF/activate", &json!({})),
    ] {
        assert_eq!(
            (status, got["error"]["code"].as_str()),
            (400, Some("invalid_path")),
            "{got}"
        );
    }
    // Unknown ids and routes.
    assert_eq!(server.get("/v1/items/absent").0, 404);
    assert_eq!(server.delete("/v1/items/absent").0, 404);
    let (status, got) = server.get("/v1/nothing-here");
    assert_eq!(
        (status, got["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, got) = server.get("/v1/items");
    assert_eq!(
        (status, got["error"]["code"].as_str()),
        (405, Some("method_not_allowed")),
        "a known route with the wrong method: {got}"
    );
    assert_eq!(
        snapshot(&server),
        before,
        "state unchanged after every bad request"
    );
    assert!(
        server.get("/v1/items/n2").0 == 404,
        "a batch with one bad item stores nothing"
    );
}

#[test]
fn too_many_inputs_is_413_and_full_queue_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(40);
    let server = Server::start(
        dir.path(),
        &[
            ("CROSSBATCH__BATCHING__MAX_INPUTS_PER_REQUEST", "32"),
            ("CROSSBATCH__BATCHING__QUEUE_CAPACITY", "32"),
            ("CROSSBATCH__BATCHING__MAX_BATCH", "4"),
        ],
    );
    let inputs: Vec<Value> = images.iter().map(|i| json!({ "image": i.png })).collect();
    let items: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(n, i)| json!({ "id": format!("i{n}"), "image": i.png }))
        .collect();
    let pngs: Vec<&str> = images.iter().map(|i| i.png.as_str()).collect();
    // 40 inputs against a limit of 32, on every route that takes several.
    for (path, body) in [
        ("/v1/embed", json!({ "inputs": inputs })),
        ("/v1/items", json!({ "items": items })),
        ("/v1/search", json!({ "queries": inputs })),
        ("/v1/classify", json!({ "inputs": inputs })),
        (
            "/v1/classes",
            json!({ "label": "l", "examples": pngs.iter().map(|p| json!({ "image": p })).collect::<Vec<_>>() }),
        ),
    ] {
        let (status, got) = server.post(path, &body);
        assert_eq!(
            (status, got["error"]["code"].as_str()),
            (413, Some("too_many_inputs")),
            "{path}: {got}"
        );
    }
    assert_eq!(server.item_count(), 0, "a refused write stores nothing");

    // 16 clients each sending 32 inputs against a queue of 32: some must be refused at once.
    let body = json!({ "inputs": inputs[..32] });
    let statuses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| server.post("/v1/embed", &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(ok >= 1, "{statuses:?}");
    assert!(!refused.is_empty(), "no request was refused: {statuses:?}");
    assert!(refused
        .iter()
        .all(|(_, b)| b["error"]["code"] == "queue_full"));
    assert_eq!(ok + refused.len(), 16, "only 200 or 429: {statuses:?}");
    let (_, metrics) = server.get_text("/metrics");
    assert!(metrics.contains("crossbatch_rejected_requests_total{reason=\"queue_full\"}"));
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
