//! `/metrics` is valid Prometheus text and counts the requests made.
mod common;

use std::collections::HashMap;

use common::{fashion_images, upsert_images, Server};
use serde_json::json;

/// One parsed sample: metric name, labels, value.
type Sample = (String, HashMap<String, String>, f64);

/// A strict parser for the Prometheus text exposition format (version 0.0.4): every line is
/// a `# HELP`, a `# TYPE` with a known type, or a sample whose name was declared.
fn parse_prometheus(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut helped = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has text");
            assert!(!help.is_empty(), "{line}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            types.insert(name.to_string(), kind.to_string());
        } else {
            assert!(!line.starts_with('#'), "unknown comment {line}");
            let (head, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}"));
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels close");
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (head.to_string(), HashMap::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name {name}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(&name);
            assert!(types.contains_key(family), "sample {name} without TYPE");
            assert!(helped.contains(family), "sample {name} without HELP");
            samples.push((name, labels, value));
        }
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn metrics_are_valid_prometheus_text_and_count_requests() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(30);
    let server = Server::start(dir.path(), &[]);
    let (status, text) = server.get_text("/metrics");
    assert_eq!(status, 200);
    let (types, _) = parse_prometheus(&text);
    for (name, kind) in [
        ("crossbatch_http_requests_total", "counter"),
        ("crossbatch_http_request_duration_seconds", "histogram"),
        ("crossbatch_rejected_requests_total", "counter"),
        ("crossbatch_queue_depth", "gauge"),
        ("crossbatch_batch_size", "histogram"),
        ("crossbatch_inference_seconds", "histogram"),
        ("crossbatch_search_seconds", "histogram"),
        ("crossbatch_index_items", "gauge"),
        ("crossbatch_model_info", "gauge"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name} at start-up"
        );
    }

    upsert_images(&server, "m", &images);
    let searches = 7;
    for image in &images[..searches] {
        let (status, _) = server.post(
            "/v1/search",
            &json!({ "query": { "image": image.png }, "k": 3 }),
        );
        assert_eq!(status, 200);
    }
    let bad = 3;
    for _ in 0..bad {
        assert_eq!(
            server
                .post(
                    "/v1/search",
                    &json!({ "query": { "item_id": "m0" }, "k": 0 })
                )
                .0,
            422
        );
    }

    assert_eq!(server.delete("/v1/items/absent").0, 404);
    // A non-standard method is one `other` series, whatever its name.
    for method in ["PURGE", "XYZZY"] {
        let response = reqwest::blocking::Client::new()
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/v1/items", server.url),
            )
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 405, "{method}");
    }

    let (_, text) = server.get_text("/metrics");
    let (_, samples) = parse_prometheus(&text);
    assert_eq!(
        value(
            &samples,
            "crossbatch_http_requests_total",
            &[
                ("route", "/v1/items"),
                ("method", "other"),
                ("status", "405")
            ],
        ),
        2.0
    );
    assert!(!text.contains("PURGE") && !text.contains("XYZZY"), "{text}");
    assert_eq!(
        value(
            &samples,
            "crossbatch_rejected_requests_total",
            &[("reason", "not_found")]
        ),
        1.0
    );
    let ok_searches = value(
        &samples,
        "crossbatch_http_requests_total",
        &[("route", "/v1/search"), ("status", "200")],
    );
    assert_eq!(ok_searches, searches as f64);
    let bad_searches = value(
        &samples,
        "crossbatch_http_requests_total",
        &[("route", "/v1/search"), ("status", "422")],
    );
    assert_eq!(bad_searches, bad as f64);
    let upserts = value(
        &samples,
        "crossbatch_http_requests_total",
        &[("route", "/v1/items"), ("status", "200")],
    );
    assert_eq!(upserts, 1.0, "30 images in one batch of 50");
    assert_eq!(
        value(
            &samples,
            "crossbatch_rejected_requests_total",
            &[("reason", "bad_input")]
        ),
        (bad + 2) as f64,
        "the k = 0 searches and the two 405s"
    );
    let latency_count = value(
        &samples,
        "crossbatch_http_request_duration_seconds_count",
        &[("route", "/v1/search")],
    );
    assert_eq!(latency_count, (searches + bad) as f64);
    assert_eq!(
        value(&samples, "crossbatch_search_seconds_count", &[]),
        searches as f64
    );
    assert_eq!(value(&samples, "crossbatch_index_items", &[]), 30.0);
    let embedded = value(&samples, "crossbatch_batch_size_sum", &[]);
    assert!(
        embedded >= (30 + searches) as f64,
        "every input went through a batch: {embedded}"
    );
    assert_eq!(
        value(
            &samples,
            "crossbatch_model_info",
            &[("device", common::test_device().as_str())]
        ),
        1.0
    );
}
