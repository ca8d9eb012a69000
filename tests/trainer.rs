//! The online trainer and generation swaps, end to end on the real server: swaps under
//! concurrent search traffic fail nothing and never mix generations; rollback and roll
//! forward work; a restart resumes the active generation.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fashion_images, upsert_images, Server, TestImage};
use serde_json::{json, Value};

/// A trainer that publishes often and moves the weights enough to see drift.
const FAST_TRAINER: [(&str, &str); 8] = [
    ("CROSSBATCH__TRAINER__ENABLED", "true"),
    ("CROSSBATCH__TRAINER__PUBLISH_EVERY", "15"),
    ("CROSSBATCH__TRAINER__DUTY_CYCLE", "1.0"),
    ("CROSSBATCH__TRAINER__LR", "0.003"),
    ("CROSSBATCH__TRAINER__PROBE_SIZE", "32"),
    ("CROSSBATCH__TRAINER__REEMBED_RATE", "0"),
    ("CROSSBATCH__TRAINER__OBJECTIVE__MEMORY_SIZE", "256"),
    ("CROSSBATCH__TRAINER__OBJECTIVE__MEMORY_START", "3"),
];

fn model_version(server: &Server) -> u64 {
    server.get("/v1/info").1["model_version"]
        .as_u64()
        .expect("model_version")
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn embed(server: &Server, image: &TestImage) -> (u64, Vec<f64>) {
    let (status, body) = server.post("/v1/embed", &json!({ "inputs": [{ "image": image.png }] }));
    assert_eq!(status, 200, "{body}");
    let v = body["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (body["model_version"].as_u64().unwrap(), v)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn swaps_under_search_traffic_fail_nothing_and_never_mix_generations() {
    let dir = tempfile::tempdir().unwrap();
    let all_images = fashion_images(700);
    // The gallery the clients query, and the writer's own images: no written item ties with a
    // gallery item (or with another written item) at score 1, so every `k` below is enough.
    let (images, written_images) = (all_images[..200].to_vec(), all_images[200..].to_vec());
    let server = Arc::new(Server::start(dir.path(), &FAST_TRAINER));
    let base = model_version(&server);
    upsert_images(&server, "fm-", &images);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|worker| {
            let (server, stop, images) = (server.clone(), stop.clone(), images.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = worker;
                while !stop.load(Ordering::SeqCst) {
                    let query =
                        json!({ "query": { "image": images[i % images.len()].png }, "k": 3 });
                    let (status, body) = server.post("/v1/search", &query);
                    seen.push((i % images.len(), status, body));
                    i += 3;
                }
                seen
            })
        })
        .collect();
    // Meanwhile a writer upserts new items and deletes some: writes made while a generation
    // is being built must reach it before it goes live.
    let writer = {
        let (server, stop, images) = (server.clone(), stop.clone(), written_images.clone());
        std::thread::spawn(move || {
            let (mut kept, mut deleted) = (Vec::new(), Vec::new());
            let mut n = 0usize;
            // One write per image, then it waits for the swaps to end.
            while !stop.load(Ordering::SeqCst) && n < images.len() {
                let image = &images[n];
                let item =
                    json!({ "id": format!("w-{n}"), "label": image.label, "image": image.png });
                let (status, body) = server.post("/v1/items", &json!({ "items": [item] }));
                assert_eq!(status, 200, "a write failed during swaps: {body}");
                kept.push(n);
                if n % 4 == 3 {
                    let victim = kept.remove(kept.len() - 2);
                    assert_eq!(server.delete(&format!("/v1/items/w-{victim}")).0, 200);
                    deleted.push(victim);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (kept, deleted)
        })
    };
    wait_for("two generation swaps", Duration::from_secs(300), || {
        model_version(&server) >= base + 2
    });
    stop.store(true, Ordering::SeqCst);
    let responses: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let (kept, deleted) = writer.join().unwrap();
    assert!(
        kept.len() > 10 && !deleted.is_empty(),
        "too few writes: {}",
        kept.len()
    );
    for n in &kept {
        let id = format!("w-{n}");
        let by_item = server
            .post(
                "/v1/search",
                &json!({ "query": { "item_id": id }, "k": 10 }),
            )
            .1;
        let listed = by_item["results"]
            .as_array()
            .is_some_and(|results| results.iter().any(|r| r["id"] == id.as_str()));
        assert!(listed, "{id} missing from the live index: {by_item}");
        let image = &written_images[*n];
        let by_image = server
            .post(
                "/v1/search",
                &json!({ "query": { "image": image.png }, "k": 10 }),
            )
            .1;
        let own = by_image["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.as_str());
        let score = own.unwrap_or_else(|| panic!("{id} not found by its image: {by_image}"))
            ["score"]
            .as_f64()
            .unwrap();
        assert!(
            score > 0.9999,
            "{id} was indexed by another generation's model: {score}"
        );
    }
    for n in &deleted {
        let id = format!("w-{n}");
        assert_eq!(server.get(&format!("/v1/items/{id}")).0, 404);
        let by_image = server
            .post(
                "/v1/search",
                &json!({ "query": { "image": written_images[*n].png }, "k": 10 }),
            )
            .1;
        assert!(
            by_image["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["id"] != id.as_str()),
            "deleted {id} came back after a swap"
        );
    }

    assert!(
        responses.len() > 20,
        "too little traffic: {}",
        responses.len()
    );
    let mut versions = std::collections::BTreeSet::new();
    for (i, status, body) in &responses {
        assert_eq!(*status, 200, "a request failed during swaps: {body}");
        versions.insert(body["model_version"].as_u64().unwrap());
        // The query was embedded by the same model that embedded the gallery item: the
        // item scores 1 against itself. A query of one generation against another
        // generation's index would score noticeably less (the models drifted apart).
        let own = body["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == format!("fm-{i}").as_str())
            .unwrap_or_else(|| panic!("fm-{i} not found: {body}"));
        let score = own["score"].as_f64().unwrap();
        assert!(
            score > 0.9999,
            "mixed generations: self-score {score} in {body}"
        );
    }
    assert!(
        versions.len() >= 2,
        "traffic saw only versions {versions:?}"
    );

    let (_, trainer) = server.get("/v1/trainer");
    assert!(trainer["step"].as_u64().unwrap() > 0, "{trainer}");
    assert!(
        trainer["memory_fill"].as_u64().unwrap() > 0,
        "XBM memory in use: {trainer}"
    );
    let drift = trainer["last_drift"].as_f64().expect("drift measured");
    eprintln!("drift between the last two generations: {drift:.4}");
    // The self-score check above can only catch mixing when generations differ by more than
    // it tolerates: a self-score of 0.9999 is a squared distance of 2e-4, ten times below this.
    assert!(drift > 2e-3 && drift < 4.0, "drift {drift}");
    let (_, models) = server.get("/v1/models");
    let generations = models["generations"].as_array().unwrap();
    assert!(generations.len() >= 3, "{models}");
    assert_eq!(models["active"], model_version(&server));
    // Each trained generation is a checkpoint in the data dir: model.toml, weights, metrics.
    let newest = generations.last().unwrap();
    assert_eq!(newest["details"]["origin"], "trainer");
    let checkpoint = std::path::PathBuf::from(newest["model_dir"].as_str().unwrap());
    assert!(checkpoint.starts_with(dir.path()), "{checkpoint:?}");
    assert!(
        checkpoint.join("model.toml").exists() && checkpoint.join("model.safetensors").exists()
    );
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["steps"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(metrics, newest["details"]);
    let (_, metrics) = server.get_text("/metrics");
    let published = metrics
        .lines()
        .find_map(|l| l.strip_prefix("crossbatch_generations_published_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(published >= 2.0, "{published}");
}

#[test]
fn rollback_roll_forward_and_restart_keep_the_active_generation() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(120);
    let probe = images[7].clone();
    let server = Server::start(dir.path(), &FAST_TRAINER);
    // With no labelled examples yet the trainer idles and says why.
    wait_for("the trainer to idle", Duration::from_secs(60), || {
        server.get("/v1/trainer").1["state"] == "idle"
    });
    let (_, status) = server.get("/v1/trainer");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 labels")),
        "{status}"
    );
    let (base, base_embedding) = embed(&server, &probe);
    upsert_images(&server, "r-", &images);
    wait_for("a trained generation", Duration::from_secs(300), || {
        model_version(&server) > base
    });
    assert_eq!(server.post("/v1/trainer/pause", &json!({})).0, 200);
    // Let a build started just before the pause finish.
    wait_for("builds to settle", Duration::from_secs(120), || {
        server.get("/v1/trainer").1["reembed"]["busy"] == false
    });
    let (trained, trained_embedding) = embed(&server, &probe);
    assert!(trained > base);
    assert!(
        max_diff(&trained_embedding, &base_embedding) > 1e-3,
        "training changed the model"
    );

    // Roll back to the base model.
    activate(&server, base);
    wait_for("the rollback", Duration::from_secs(120), || {
        model_version(&server) == base
    });
    let (version, embedding) = embed(&server, &probe);
    assert_eq!(version, base);
    assert!(
        max_diff(&embedding, &base_embedding) < 1e-5,
        "rollback serves the base weights"
    );
    assert_index_matches_model(&server, &probe, "r-7");
    assert_eq!(server.post("/v1/models/999/activate", &json!({})).0, 404);

    // Resumed, the trainer continues from the activated base weights, not from the weights it
    // had trained before the rollback: the first generation it publishes has the base as parent.
    let recorded_before = latest_recorded(&server);
    assert_eq!(server.post("/v1/trainer/resume", &json!({})).0, 200);
    wait_for(
        "a generation trained after the rollback",
        Duration::from_secs(300),
        || model_version(&server) > recorded_before,
    );
    assert_eq!(server.post("/v1/trainer/pause", &json!({})).0, 200);
    let (_, models) = server.get("/v1/models");
    let first_after = models["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["version"].as_u64() > Some(recorded_before))
        .min_by_key(|g| g["version"].as_u64())
        .unwrap_or_else(|| panic!("a generation after {recorded_before}: {models}"));
    assert_eq!(first_after["details"]["parent"], base, "{first_after}");
    wait_for("builds to settle", Duration::from_secs(120), || {
        server.get("/v1/trainer").1["reembed"]["busy"] == false
    });
    let active = model_version(&server);

    // A restart (SIGKILL) comes back on the active generation.
    server.kill();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(model_version(&server), active);
    assert_eq!(server.item_count(), 120);

    // Roll forward again, then restart once more.
    activate(&server, trained);
    wait_for("the roll forward", Duration::from_secs(120), || {
        model_version(&server) == trained
    });
    assert!(max_diff(&embed(&server, &probe).1, &trained_embedding) < 1e-5);
    server.kill();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(model_version(&server), trained);
    let (_, item) = server.get("/v1/items/r-7");
    assert_eq!(
        item["model_version"], trained,
        "stored embeddings refreshed to the active model"
    );
    assert_index_matches_model(&server, &probe, "r-7");

    // SIGTERM while the trainer steps and a build re-embeds the gallery: the step ends within
    // the grace period, the build is dropped, and the process exits with 0 (a shutdown the
    // grace period cut short exits with 1; one that ran libtorch's exit handlers under the
    // build crashed).
    server.kill();
    let server = Server::start(dir.path(), &FAST_TRAINER);
    wait_for("the trainer to step", Duration::from_secs(120), || {
        server.get("/v1/trainer").1["step"].as_u64() >= Some(3)
    });
    activate(&server, base);
    let status = server.terminate();
    assert!(status.success(), "SIGTERM ended the server with {status}");
}

/// The newest generation version the server has recorded (live or not).
fn latest_recorded(server: &Server) -> u64 {
    let (_, models) = server.get("/v1/models");
    models["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["version"].as_u64())
        .max()
        .unwrap_or_else(|| panic!("no generation: {models}"))
}

/// Activates `version` (202), retrying while a build that started before the trainer was
/// paused is still running (409 `build_in_progress`).
fn activate(server: &Server, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = server.post(&format!("/v1/models/{version}/activate"), &json!({}));
        if status == 202 {
            return;
        }
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "build_in_progress", "{body}");
        assert!(Instant::now() < deadline, "a build never ended: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The stored item `id` of `image` is found first with score 1: the live index was embedded
/// by the same model that embeds the query.
fn assert_index_matches_model(server: &Server, image: &TestImage, id: &str) {
    let results = server
        .post(
            "/v1/search",
            &json!({ "query": { "image": image.png }, "k": 1 }),
        )
        .1;
    assert_eq!(results["results"][0]["id"], id, "{results}");
    let score = results["results"][0]["score"].as_f64().unwrap();
    assert!(
        score > 0.9999,
        "index and model disagree: self-score {score}"
    );
}

/// The value of an unlabelled metric in the server's Prometheus text.
fn metric(server: &Server, name: &str) -> f64 {
    let (_, metrics) = server.get_text("/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
}

/// A learning rate that makes the weights blow up after the first step: every later loss is
/// not finite, so every later step fails and changes nothing. The trainer reports `failing`, counts
/// the failures, and after ten in a row drops its weights and restarts from the live
/// generation; nothing diverged is published and serving is untouched.
#[test]
fn a_diverging_trainer_reports_failing_and_restarts_from_the_live_generation() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = FAST_TRAINER.to_vec();
    config.retain(|(key, _)| *key != "CROSSBATCH__TRAINER__LR");
    config.push(("CROSSBATCH__TRAINER__LR", "1e30"));
    let server = Server::start(dir.path(), &config);
    let base = model_version(&server);
    let images = fashion_images(40);
    upsert_images(&server, "d-", &images);
    let counter = |name: &str| metric(&server, name);
    let mut seen_failing = false;
    wait_for(
        "a restart after failed steps",
        Duration::from_secs(300),
        || {
            let (_, status) = server.get("/v1/trainer");
            if status["state"] == "failing" {
                seen_failing = true;
                let message = status["message"].as_str().unwrap_or_default();
                assert!(message.contains("failed"), "{status}");
            }
            counter("crossbatch_trainer_restarts_total") >= 1.0
        },
    );
    assert!(seen_failing, "the trainer never reported failing");
    assert!(counter("crossbatch_trainer_failed_steps_total") >= 10.0);
    // The restart started again from the live generation, which is still the base one
    // (no session reaches `publish_every` steps): nothing diverged was published.
    let (_, status) = server.get("/v1/trainer");
    assert_eq!(status["base_generation"], base, "{status}");
    assert_eq!(model_version(&server), base);
    let (code, body) = server.post(
        "/v1/search",
        &json!({ "query": { "image": images[0].png }, "k": 1 }),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["results"][0]["id"], "d-0", "{body}");
    server.kill();
}

/// Exports a TorchScript model (linear 784 → 16 on 28×28 inputs) whose training leaves a
/// buffer behind that makes its eval-mode embeddings infinite, as NaN BatchNorm statistics
/// would (a skipped step cannot restore a TorchScript module's buffers). `None`: no venv
/// Python and skipping is allowed.
fn export_model_poisoned_by_training(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let source = "import os, torch\n\
                  class M(torch.nn.Module):\n\
                  \x20   def __init__(self):\n\
                  \x20       super().__init__()\n\
                  \x20       self.fc = torch.nn.Linear(784, 16)\n\
                  \x20       self.register_buffer('trained', torch.zeros(1))\n\
                  \x20   def forward(self, x):\n\
                  \x20       y = self.fc(x.flatten(1))\n\
                  \x20       if self.training:\n\
                  \x20           self.trained.fill_(1.0)\n\
                  \x20           return y\n\
                  \x20       return y / (1.0 - self.trained)\n\
                  torch.manual_seed(0)\n\
                  torch.jit.script(M()).save(os.environ['OUT'])\n";
    let model = dir.join("poisoned");
    std::fs::create_dir_all(&model).unwrap();
    if !crossbatch::model::test_support::export_torchscript(source, &model.join("model.pt")) {
        return None;
    }
    std::fs::write(
        model.join("model.toml"),
        "name = \"poisoned-by-training\"\nformat = \"torchscript\"\narchitecture = \"linear\"\n\
         embedding_dim = 16\nweights = \"model.pt\"\n\n[input]\nchannels = 1\nheight = 28\n\
         width = 28\nmean = [0.286]\nstd = [0.353]\n",
    )
    .unwrap();
    Some(model)
}

/// Every step succeeds, but the trained model's embeddings are not finite: each publish
/// refuses it and the trainer restarts from the live generation at once (instead of training
/// on and failing to publish forever); serving is untouched. (`PUBLISH_EVERY` = 15 comes before
/// the trainer's first re-read of the store at step 50, whose eval-mode embeddings of the
/// replay candidates would not be finite either.)
#[test]
fn a_trainer_whose_model_turns_non_finite_restarts_instead_of_publishing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(model) = export_model_poisoned_by_training(dir.path()) else {
        return;
    };
    let server = Server::start_on_model(&dir.path().join("data"), &model, &FAST_TRAINER);
    let base = model_version(&server);
    let images = fashion_images(40);
    upsert_images(&server, "p-", &images);
    wait_for(
        "a restart after a refused publish",
        Duration::from_secs(300),
        || metric(&server, "crossbatch_trainer_restarts_total") >= 1.0,
    );
    assert_eq!(
        metric(&server, "crossbatch_trainer_failed_steps_total"),
        0.0,
        "the restart came from the publish, not from failed steps"
    );
    let (_, status) = server.get("/v1/trainer");
    assert_eq!(status["base_generation"], base, "{status}");
    assert_eq!(model_version(&server), base, "nothing was published");
    let (_, models) = server.get("/v1/models");
    assert_eq!(
        models["generations"].as_array().unwrap().len(),
        1,
        "{models}"
    );
    let (code, body) = server.post(
        "/v1/search",
        &json!({ "query": { "image": images[0].png }, "k": 1 }),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["results"][0]["id"], "p-0", "{body}");
    server.kill();
}

/// With `keep_generations = 2` a trainer that publishes again and again keeps only its two
/// newest generations (and the live one), records and directories alike; the base model
/// stays.
#[test]
fn old_trainer_generations_are_deleted_beyond_keep_generations() {
    let dir = tempfile::tempdir().unwrap();
    let config = [
        &FAST_TRAINER[..],
        &[("CROSSBATCH__TRAINER__KEEP_GENERATIONS", "2")],
    ]
    .concat();
    let server = Server::start(dir.path(), &config);
    let base = model_version(&server);
    upsert_images(&server, "k-", &fashion_images(40));
    wait_for("five trainer generations", Duration::from_secs(300), || {
        model_version(&server) >= base + 5
    });
    let (_, models) = server.get("/v1/models");
    let versions: Vec<u64> = models["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions[0], base, "the base model stays: {models}");
    let trained = versions.len() - 1;
    assert!((2..=3).contains(&trained), "{models}");
    let live = model_version(&server);
    assert!(versions.contains(&live), "{models}");
    let on_disk = std::fs::read_dir(dir.path().join("generations"))
        .unwrap()
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert!(
        on_disk <= 3,
        "{on_disk} generation directories left: {models}"
    );
    server.kill();
}
