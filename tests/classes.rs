//! Uploading a new class end to end, on the real server with the shipped default model: a
//! Hangul glyph class the model has never seen is uploaded through `POST /v1/classes`; within
//! the configured focus steps the trainer learns it and publishes the generation the upload
//! response named; that class's Recall@1 rises while the old classes' Recall@1 drops by no
//! more than [`MAX_OLD_CLASS_DROP`]. Also `GET /v1/classes`, `POST /v1/classify` and bad input.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{fashion_images, upsert_images, Server, TestImage};
use crossbatch::data::glyphs::{self, DEBIAN_HANGUL_FONT_DIRS};
use serde_json::{json, Value};

/// Largest allowed fall of the old classes' Recall@1 (0.860 before) after learning the new
/// class: measured 0.015–0.055 over ten runs, with or without replay (all old items stay in the
/// store, and batches without replay are padded with them); example ids are random, so batches
/// and the fall vary from run to run. It guards against damage, not for replay's gain.
const MAX_OLD_CLASS_DROP: f64 = 0.08;
/// Least rise of the new class's Recall@1 (0.684 before; measured 0.09–0.18 over ten runs).
const MIN_NEW_CLASS_GAIN: f64 = 0.05;
/// Least head accuracy on 700 held-out images of the old classes with low-fidelity replay
/// (between the ~0.70 of classifying the images as they are and the ~0.79 of classifying
/// their renderings).
const MIN_LOW_FIDELITY_OLD_ACCURACY: f64 = 0.74;
/// Trainer steps spent on the uploaded class before it is published.
const FOCUS_STEPS: &str = "60";

/// Starts paused, so every measurement before the upload sees the base generation.
const CLASS_TRAINER: [(&str, &str); 8] = [
    ("CROSSBATCH__TRAINER__ENABLED", "true"),
    ("CROSSBATCH__TRAINER__START_PAUSED", "true"),
    ("CROSSBATCH__TRAINER__PUBLISH_EVERY", "100000"),
    ("CROSSBATCH__TRAINER__DUTY_CYCLE", "1.0"),
    ("CROSSBATCH__TRAINER__REEMBED_RATE", "0"),
    ("CROSSBATCH__TRAINER__OBJECTIVE__MEMORY_SIZE", "512"),
    ("CROSSBATCH__TRAINER__OBJECTIVE__MEMORY_START", "0"),
    ("CROSSBATCH__TRAINER__CLASSES__FOCUS_STEPS", FOCUS_STEPS),
];

/// Renders `ch` in every Debian Korean font as 28×28 base64 PNGs.
fn glyph_images(ch: char) -> Vec<String> {
    let dirs: Vec<PathBuf> = DEBIAN_HANGUL_FONT_DIRS.iter().map(PathBuf::from).collect();
    let fonts = glyphs::discover_fonts(&dirs).expect("Korean fonts (run scripts/setup.sh)");
    fonts
        .iter()
        .filter(|p| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            !glyphs::BROKEN_FONTS.contains(&stem)
        })
        .filter_map(|p| glyphs::load_font(p).ok())
        .filter_map(|font| glyphs::render(&font, ch, 28))
        .map(|image| {
            let mut png = std::io::Cursor::new(Vec::new());
            image
                .write_to(&mut png, image::ImageFormat::Png)
                .expect("png");
            base64::engine::general_purpose::STANDARD.encode(png.into_inner())
        })
        .collect()
}

/// Fraction of `queries` (image, label) whose first answer from `endpoint` has their label.
fn top1_rate(server: &Server, endpoint: Top1, queries: &[(String, String)]) -> f64 {
    let (path, list, answers) = match endpoint {
        Top1::NearestItem => ("/v1/search", "queries", "results"),
        Top1::HeadClass => ("/v1/classify", "inputs", "predictions"),
    };
    let mut hits = 0;
    for chunk in queries.chunks(32) {
        let inputs: Vec<Value> = chunk
            .iter()
            .map(|(png, _)| json!({ "image": png }))
            .collect();
        let (status, body) = server.post(path, &json!({ list: inputs, "k": 1 }));
        assert_eq!(status, 200, "{body}");
        for ((_, label), answer) in chunk.iter().zip(body[answers].as_array().unwrap()) {
            if answer[0]["label"].as_str() == Some(label.as_str()) {
                hits += 1;
            }
        }
    }
    hits as f64 / queries.len() as f64
}

/// What [`top1_rate`] asks for.
#[derive(Clone, Copy)]
enum Top1 {
    /// The nearest gallery item (`/v1/search`): Recall@1.
    NearestItem,
    /// The most probable class (`/v1/classify`): head accuracy.
    HeadClass,
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn upload(server: &Server, label: &str, images: &[String], index: bool) -> (u16, Value) {
    let examples: Vec<Value> = images.iter().map(|png| json!({ "image": png })).collect();
    server.post(
        "/v1/classes",
        &json!({ "label": label, "examples": examples, "index": index }),
    )
}

fn classes_by_label(server: &Server) -> HashMap<String, Value> {
    let (status, body) = server.get("/v1/classes");
    assert_eq!(status, 200, "{body}");
    body["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["label"].as_str().unwrap().to_owned(), c.clone()))
        .collect()
}

/// Stores the old classes as plain labelled items — 10 Fashion-MNIST classes and four glyph
/// classes, the confusers of the new one — and returns `held_out` other Fashion-MNIST images
/// as queries.
fn store_old_classes(server: &Server, held_out: usize) -> Vec<(String, String)> {
    let fashion = fashion_images(300 + held_out);
    upsert_images(server, "f", &fashion[..300]);
    for (i, ch) in ['가', '나', '다', '라'].into_iter().enumerate() {
        let images = glyph_images(ch);
        assert!(
            images.len() >= 30,
            "only {} fonts render {ch}",
            images.len()
        );
        let items: Vec<Value> = images[..15]
            .iter()
            .enumerate()
            .map(|(j, png)| json!({ "id": format!("g{i}-{j}"), "label": format!("glyph-{i}"), "image": png }))
            .collect();
        let (status, body) = server.post("/v1/items", &json!({ "items": items }));
        assert_eq!(status, 200, "{body}");
    }
    fashion[300..]
        .iter()
        .map(|TestImage { png, label }| (png.clone(), label.clone()))
        .collect()
}

/// The new class: 15 glyph images to upload and the rest, labelled, as held-out queries.
fn new_class_images() -> (Vec<String>, Vec<(String, String)>) {
    let images = glyph_images('마');
    let queries = images[15..]
        .iter()
        .map(|png| (png.clone(), "new-glyph".to_owned()))
        .collect();
    (images[..15].to_vec(), queries)
}

/// The L2-normalised embedding the live model gives a base64 image.
fn embed(server: &Server, image: &str) -> Vec<f64> {
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": [{ "image": image }] }));
    assert_eq!(status, 200, "{body}");
    body["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Label probabilities, best first, of nearest-class-mean classification without a head:
/// softmax over every label of 16 · cos(query, normalised mean of the label's embeddings).
/// The gallery is what [`store_old_classes`] stored and the uploaded examples `new_ids`, all
/// read back from `GET /v1/items` (so the upload's ids must name its stored examples).
fn class_mean_probabilities(
    server: &Server,
    query: &str,
    new_ids: &[String],
) -> Vec<(String, f64)> {
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    let mut add = |label: &str, embedding: Vec<f64>| {
        let sum = sums
            .entry(label.to_owned())
            .or_insert_with(|| vec![0.0; embedding.len()]);
        sum.iter_mut().zip(&embedding).for_each(|(s, x)| *s += x);
    };
    let stored = (0..300)
        .map(|i| format!("f{i}"))
        .chain((0..4).flat_map(|g| (0..15).map(move |j| format!("g{g}-{j}"))))
        .chain(new_ids.iter().map(|id| id.replace('#', "%23")));
    for id in stored {
        let (status, item) = server.get(&format!("/v1/items/{id}"));
        assert_eq!(status, 200, "{item}");
        let embedding = item["embedding"].as_array().unwrap();
        add(
            item["label"].as_str().unwrap(),
            embedding.iter().map(|x| x.as_f64().unwrap()).collect(),
        );
    }
    let query = embed(server, query);
    let logits: Vec<(String, f64)> = sums
        .into_iter()
        .map(|(label, sum)| {
            let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
            let cos = sum.iter().zip(&query).map(|(s, q)| s * q).sum::<f64>() / norm;
            (label, 16.0 * cos)
        })
        .collect();
    let z: f64 = logits.iter().map(|(_, l)| l.exp()).sum();
    let mut probabilities: Vec<(String, f64)> = logits
        .into_iter()
        .map(|(label, l)| (label, l.exp() / z))
        .collect();
    probabilities.sort_by(|a, b| b.1.total_cmp(&a.1));
    probabilities
}

/// Resumes the paused trainer and waits until `generation` is live.
fn learn_until_live(server: &Server, generation: u64) {
    assert_eq!(
        server.get("/v1/trainer").1["state"],
        "paused",
        "start_paused"
    );
    // A paused trainer still reads the store for its status (every 5 s, and after uploads).
    wait_for(
        "the paused trainer to report its examples",
        Duration::from_secs(30),
        || server.get("/v1/trainer").1["examples"].as_u64() > Some(0),
    );
    let (status, body) = server.post("/v1/trainer/resume", &json!({}));
    assert_eq!(status, 200);
    assert_ne!(
        body["state"], "paused",
        "the answer is the resumed status: {body}"
    );
    wait_for(
        "the generation that includes the class",
        Duration::from_secs(600),
        || server.get("/v1/info").1["model_version"].as_u64() >= Some(generation),
    );
}

#[test]
fn an_uploaded_class_is_learnt_without_forgetting_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &CLASS_TRAINER);
    let old_queries = store_old_classes(&server, 200);
    let (new_images, new_queries) = new_class_images();

    let old_before = top1_rate(&server, Top1::NearestItem, &old_queries);
    let (status, body) = upload(&server, "new-glyph", &new_images, true);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stored"], 15);
    let new_ids: Vec<String> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(new_ids.len(), 15);
    let first_generation = body["first_generation"].as_u64().expect("first_generation");
    let new_before = top1_rate(&server, Top1::NearestItem, &new_queries);
    let listed = classes_by_label(&server);
    assert_eq!(listed["new-glyph"]["examples"], 15);
    assert_eq!(listed["new-glyph"]["first_generation"], Value::Null);
    assert_eq!(listed["new-glyph"]["expected_generation"], first_generation);
    let label_3 = fashion_images(300)
        .iter()
        .filter(|i| i.label == "3")
        .count();
    assert_eq!(listed["3"]["indexed"], label_3);

    // Before the head has learnt it, classification falls back to class means: the softmax of
    // 16 · cos(query, normalised mean of each label's indexed embeddings), recomputed here.
    let (status, body) = server.post(
        "/v1/classify",
        &json!({ "inputs": [{ "image": new_queries[0].0 }], "k": 3 }),
    );
    assert_eq!(status, 200, "{body}");
    let predicted = body["predictions"][0].as_array().unwrap();
    let expected = class_mean_probabilities(&server, &new_queries[0].0, &new_ids);
    assert_eq!(predicted.len(), 3);
    for (got, (label, probability)) in predicted.iter().zip(&expected) {
        assert_eq!(got["label"], label.as_str(), "{body} vs {expected:?}");
        let got = got["probability"].as_f64().unwrap();
        assert!(
            (got - probability).abs() < 1e-4,
            "{label}: {got} vs {probability}"
        );
    }

    learn_until_live(&server, first_generation);
    let (_, models) = server.get("/v1/models");
    let published = models["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["version"] == first_generation)
        .unwrap_or_else(|| panic!("generation {first_generation}: {models}"));
    assert!(
        published["details"]["steps"].as_u64().unwrap() <= FOCUS_STEPS.parse::<u64>().unwrap(),
        "published within the focus steps: {published}"
    );
    let new_after = top1_rate(&server, Top1::NearestItem, &new_queries);
    let old_after = top1_rate(&server, Top1::NearestItem, &old_queries);
    eprintln!(
        "new class R@1 {new_before:.3} → {new_after:.3}; old classes {old_before:.3} → {old_after:.3}"
    );
    assert!(
        new_after >= new_before + MIN_NEW_CLASS_GAIN,
        "new class R@1 {new_before} → {new_after}"
    );
    assert!(
        old_after >= old_before - MAX_OLD_CLASS_DROP,
        "old classes R@1 {old_before} → {old_after}"
    );

    let (_, metrics) = server.get_text("/metrics");
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    assert_eq!(gauge("crossbatch_classes_pending"), 0.0);
    assert_eq!(gauge("crossbatch_classes_learnt_total"), 1.0);
    assert!(gauge("crossbatch_replay_bytes") > 0.0);

    let listed = classes_by_label(&server);
    assert_eq!(listed["new-glyph"]["first_generation"], first_generation);
    assert_eq!(listed["new-glyph"]["in_head"], true);
    let (_, all) = server.get("/v1/classes");
    let used = all["replay"]["used_bytes"].as_u64().unwrap();
    assert!(used > 0 && used <= all["replay"]["budget_bytes"].as_u64().unwrap());
    assert_eq!(all["head_low_fidelity_input"], Value::Null, "full fidelity");
    assert!(listed["3"]["replay_exemplars"].as_u64().unwrap() > 0);

    // The head classifies held-out glyphs of the new class.
    let inputs: Vec<Value> = new_queries
        .iter()
        .map(|(png, _)| json!({ "image": png }))
        .collect();
    let (status, body) = server.post("/v1/classify", &json!({ "inputs": inputs, "k": 2 }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"].as_u64(), Some(first_generation));
    let predictions = body["predictions"].as_array().unwrap();
    let correct = predictions
        .iter()
        .filter(|p| p[0]["label"] == "new-glyph")
        .count();
    assert!(
        correct * 2 > predictions.len(),
        "head accuracy on the new class {correct}/{}",
        predictions.len()
    );
    for p in predictions {
        let probabilities: Vec<f64> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["probability"].as_f64().unwrap())
            .collect();
        assert!(probabilities[0] >= probabilities[1] && probabilities[0] <= 1.0);
    }

    // Deleting a class's items drops their exemplars from the replay memory at the trainer's
    // next read of the store: its bytes leave the memory's total.
    let (_, all) = server.get("/v1/classes");
    let used = all["replay"]["used_bytes"].as_u64().unwrap();
    let label_3 = classes_by_label(&server)["3"]["replay_bytes"]
        .as_u64()
        .unwrap();
    assert!(label_3 > 0);
    let all_labels = json!({ "inputs": inputs[..2], "k": 50 });
    let (_, body) = server.post("/v1/classify", &all_labels);
    assert!(body.to_string().contains(r#""label":"3""#), "{body}");
    for (i, image) in fashion_images(300).iter().enumerate() {
        if image.label == "3" {
            assert_eq!(server.delete(&format!("/v1/items/f{i}")).0, 200);
        }
    }
    // A head class whose last example is gone is no longer named, at once.
    let (status, body) = server.post("/v1/classify", &all_labels);
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains(r#""label":"3""#), "{body}");
    wait_for(
        "the deleted items' exemplars to leave the replay memory",
        Duration::from_secs(300),
        || server.get("/v1/classes").1["replay"]["used_bytes"] == used - label_3,
    );
    assert!(!classes_by_label(&server).contains_key("3"));

    // More examples of the learnt class: it is not pending again, and the upload names the
    // generation that included it.
    let (status, body) = upload(&server, "new-glyph", &new_images[..2], false);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["first_generation"], first_generation);
    assert_eq!(server.get("/v1/trainer").1["pending_classes"], json!([]));

    // Deleting the class removes its items and examples at once; the trainer drops it from
    // the head and publishes a generation without it.
    let live = server.get("/v1/info").1["model_version"].as_u64().unwrap();
    let (status, body) = server.delete("/v1/classes/new-glyph");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted_items"], &body["deleted_training_only"]),
        (&json!(15), &json!(2)),
        "{body}"
    );
    let encoded = new_ids[0].replace('#', "%23");
    assert_eq!(server.get(&format!("/v1/items/{encoded}")).0, 404);
    assert!(!classes_by_label(&server).contains_key("new-glyph"));
    // The live head no longer names it, at once ...
    let (status, body) = server.post("/v1/classify", &all_labels);
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains("new-glyph"), "{body}");
    // ... and the trainer publishes a head without it. (A build already running when the
    // class was deleted may still include it.)
    wait_for(
        "a generation whose head no longer predicts the deleted class",
        Duration::from_secs(300),
        || {
            let (status, body) = server.post("/v1/classify", &json!({ "inputs": inputs, "k": 3 }));
            assert_eq!(status, 200, "{body}");
            body["model_version"].as_u64() > Some(live) && !body.to_string().contains("new-glyph")
        },
    );
    server.kill();
}

/// With low-fidelity replay the old classes are trained at low fidelity only while a new one is
/// learnt, and on the images as they are the head sends many of them to the new class
/// (measured: ~0.70 head accuracy on the old classes). The published head says so and
/// classifies each input's low-fidelity rendering instead (measured: ~0.79).
#[test]
fn a_head_trained_with_low_fidelity_replay_classifies_low_fidelity_renderings() {
    let dir = tempfile::tempdir().unwrap();
    let low_fidelity = [(
        "CROSSBATCH__TRAINER__CLASSES__REPLAY_MEMORY__FIDELITY",
        "low",
    )];
    let server = Server::start(dir.path(), &[&CLASS_TRAINER[..], &low_fidelity].concat());
    let old_queries = store_old_classes(&server, 700);
    let (new_images, new_queries) = new_class_images();
    let (status, body) = upload(&server, "new-glyph", &new_images, true);
    assert_eq!(status, 200, "{body}");
    let generation = body["first_generation"].as_u64().expect("first_generation");
    learn_until_live(&server, generation);

    let (_, models) = server.get("/v1/models");
    let model_dir = models["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["version"].as_u64() == Some(generation))
        .and_then(|g| g["model_dir"].as_str())
        .expect("the generation's model_dir")
        .to_owned();
    let head: Value = serde_json::from_slice(
        &std::fs::read(PathBuf::from(model_dir).join("class_head.json")).unwrap(),
    )
    .unwrap();
    let rendering = json!({ "downsample": 2, "jpeg_quality": 75 });
    assert_eq!(head["low_fidelity_input"], rendering);
    assert_eq!(
        server.get("/v1/classes").1["head_low_fidelity_input"],
        rendering
    );
    let old = top1_rate(&server, Top1::HeadClass, &old_queries);
    let new = top1_rate(&server, Top1::HeadClass, &new_queries);
    eprintln!("low-fidelity head accuracy: old classes {old:.3}, new class {new:.3}");
    assert!(
        old >= MIN_LOW_FIDELITY_OLD_ACCURACY,
        "old-class head accuracy {old}"
    );
    assert!(new > 0.5, "new-class head accuracy {new}");
    server.kill();
}

#[test]
fn bad_class_uploads_and_classify_requests_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let image = fashion_images(1)[0].png.clone();
    // Finite values so large that the model's activations overflow: the embedding is NaN.
    let overflowing = json!({ "tensor": vec![3.0e38f32; 28 * 28], "shape": [1, 28, 28] });

    // Nothing is known yet: classification has no candidates.
    let (status, body) = server.post("/v1/classify", &json!({ "inputs": [{ "image": image }] }));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("no_classes"))
    );

    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({ "label": "", "examples": [{ "image": image }] }),
            422,
            "invalid_label",
        ),
        (
            json!({ "label": "x\u{7}", "examples": [{ "image": image }] }),
            422,
            "invalid_label",
        ),
        (
            json!({ "label": "a".repeat(300), "examples": [{ "image": image }] }),
            422,
            "invalid_label",
        ),
        (
            json!({ "label": "x", "examples": [] }),
            400,
            "empty_request",
        ),
        (
            json!({ "label": "x", "examples": [{ "image": "bm90IGFuIGltYWdl" }] }),
            422,
            "invalid_image",
        ),
        (
            json!({ "label": "x", "examples": [{ "image": image }], "colour": 1 }),
            400,
            "invalid_json",
        ),
        (
            json!({ "examples": [{ "image": image }] }),
            400,
            "invalid_json",
        ),
        (
            json!({ "label": "x", "examples": [{ "image": image }, overflowing] }),
            422,
            "degenerate_embedding",
        ),
    ];
    for (body, status, code) in cases {
        let (got, response) = server.post("/v1/classes", &body);
        assert_eq!(got, status, "{body} → {response}");
        assert_eq!(response["error"]["code"], code, "{response}");
    }
    let (_, listed) = server.get("/v1/classes");
    assert_eq!(
        listed["classes"],
        json!([]),
        "refused uploads stored nothing"
    );

    // A training-only upload is stored and listed but not searchable.
    let (status, body) = upload(&server, "shirt", &[image.clone(), image.clone()], false);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["first_generation"],
        Value::Null,
        "no trainer, no generation"
    );
    // Examples added to an existing label through the same call join it.
    let (status, body) = upload(&server, "shirt", std::slice::from_ref(&image), false);
    assert_eq!(status, 200, "{body}");
    // Items and training-only examples share one id space.
    let taken = json!({ "items": [{ "id": body["ids"][0], "label": "bag", "image": image }] });
    let (status, response) = server.post("/v1/items", &taken);
    assert_eq!(
        (status, response["error"]["code"].as_str()),
        (422, Some("duplicate_id")),
        "{response}"
    );
    let listed = classes_by_label(&server);
    assert_eq!(listed["shirt"]["training_only"], 3);
    assert_eq!(listed["shirt"]["indexed"], 0);
    assert_eq!(server.item_count(), 0);
    // An indexed class: classification has a candidate now.
    let (status, body) = upload(&server, "bag", &[image.clone(), image.clone()], true);
    assert_eq!(status, 200, "{body}");

    for (body, status, code) in [
        (
            json!({ "inputs": [{ "image": image }], "k": 0 }),
            422,
            "invalid_k",
        ),
        (json!({ "inputs": [] }), 400, "empty_request"),
        (
            json!({ "inputs": [{ "image": "%%" }] }),
            400,
            "invalid_base64",
        ),
        (
            json!({ "inputs": [{ "image": image }, overflowing] }),
            422,
            "degenerate_embedding",
        ),
    ] {
        let (got, response) = server.post("/v1/classify", &body);
        assert_eq!(got, status, "{body} → {response}");
        assert_eq!(response["error"]["code"], code, "{response}");
    }
    let (status, body) = server.post("/v1/classify", &json!({ "inputs": [{ "image": image }] }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"][0][0]["label"], "bag", "{body}");

    // Deleting classes: everything with the label goes, in one step.
    for (path, status, code) in [
        ("/v1/classes/%20", 422, "invalid_label"),
        ("/v1/classes/absent", 404, "not_found"),
    ] {
        let (got, response) = server.delete(path);
        assert_eq!(
            (got, response["error"]["code"].as_str()),
            (status, Some(code))
        );
    }
    let (status, body) = server.delete("/v1/classes/shirt");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "label": "shirt", "deleted_items": 0, "deleted_training_only": 3,
                "was_registered": true })
    );
    let (status, body) = server.delete("/v1/classes/bag");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted_items"], 2, "{body}");
    assert_eq!(server.item_count(), 0);
    assert_eq!(server.get("/v1/classes").1["classes"], json!([]));
    assert_eq!(server.delete("/v1/classes/bag").0, 404, "deleted already");
    // Its items left the index with it: nothing is known to classify by again.
    let (status, body) = server.post("/v1/classify", &json!({ "inputs": [{ "image": image }] }));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("no_classes"))
    );
    server.kill();
}
