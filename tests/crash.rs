//! Crash safety in the style of Qdrant's crasher: SIGKILL the server while a client upserts
//! and deletes, restart, and check that every acknowledged write is there — no loss, no
//! phantom items, no deleted item back (in the store or in the rebuilt index).
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fashion_images, Server};
use serde_json::json;

#[test]
fn acknowledged_writes_survive_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion_images(200);
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    // Acknowledged deletes, and every id a delete was sent for (acknowledged or cut).
    let deleted = Arc::new(Mutex::new(BTreeSet::new()));
    let delete_sent = Arc::new(Mutex::new(BTreeSet::new()));
    // Requests the kill cut after they had reached the server (not refused connections).
    let cut = Arc::new(AtomicUsize::new(0));
    let mut attempted = BTreeSet::new();
    let mut next_id = 0usize;
    for round in 0..4u64 {
        let server = Server::start(dir.path(), &[]);
        // Everything acknowledged before this start must be present.
        for id in acknowledged.lock().unwrap().iter() {
            let (status, _) = server.get(&format!("/v1/items/{id}"));
            assert_eq!(status, 200, "round {round}: acknowledged item {id} lost");
        }
        for id in deleted.lock().unwrap().iter() {
            let (status, _) = server.get(&format!("/v1/items/{id}"));
            assert_eq!(status, 404, "round {round}: deleted item {id} is back");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (url, stop, acknowledged, cut) = (
                server.url.clone(),
                stop.clone(),
                acknowledged.clone(),
                cut.clone(),
            );
            let (deleted, delete_sent) = (deleted.clone(), delete_sent.clone());
            let images = images.clone();
            let first = next_id;
            std::thread::spawn(move || {
                let mut id = first;
                let client = reqwest::blocking::Client::new();
                while !stop.load(Ordering::SeqCst) {
                    let batch: Vec<_> = (id..id + 5)
                        .map(|i| json!({ "id": format!("c{i}"), "label": "x", "image": images[i % images.len()].png }))
                        .collect();
                    let sent = client
                        .post(format!("{url}/v1/items"))
                        .json(&json!({ "items": batch }))
                        .send();
                    // Only a 200 is an acknowledgement; a cut connection is not.
                    match sent {
                        Ok(r) if r.status() == 200 => acknowledged
                            .lock()
                            .unwrap()
                            .extend((id..id + 5).map(|i| format!("c{i}"))),
                        Err(e) if !e.is_connect() => {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    // Every other request, delete the first item of the one before: an
                    // acknowledged delete is final; a cut one leaves the item either way.
                    if id % 10 == 5 {
                        let victim = format!("c{}", id - 5);
                        delete_sent.lock().unwrap().insert(victim.clone());
                        acknowledged.lock().unwrap().remove(&victim);
                        let gone = client.delete(format!("{url}/v1/items/{victim}")).send();
                        if gone.is_ok_and(|r| r.status() == 200) {
                            deleted.lock().unwrap().insert(victim);
                        }
                    }
                    id += 5;
                }
                id
            })
        };
        std::thread::sleep(Duration::from_millis(300 + 250 * round));
        // SIGKILL while the writer is still sending.
        kill_mid_write(server, &stop, writer, &mut next_id, &mut attempted);
    }
    let server = Server::start(dir.path(), &[]);
    let acknowledged = acknowledged.lock().unwrap();
    let (deleted, delete_sent) = (deleted.lock().unwrap(), delete_sent.lock().unwrap());
    assert!(!deleted.is_empty(), "no delete was acknowledged");
    for id in deleted.iter() {
        assert_eq!(
            server.get(&format!("/v1/items/{id}")).0,
            404,
            "{id} is back"
        );
    }
    // Nor does the index rebuilt at start-up find them.
    for image in images.iter().take(20) {
        let (status, found) = server.post(
            "/v1/search",
            &json!({ "query": { "image": image.png }, "k": 100 }),
        );
        assert_eq!(status, 200, "{found}");
        for hit in found["results"].as_array().unwrap() {
            let id = hit["id"].as_str().unwrap();
            assert!(!deleted.contains(id), "search found deleted {id}");
        }
    }
    assert!(
        acknowledged.len() >= 20,
        "the test wrote too little: {}",
        acknowledged.len()
    );
    // What the store holds of every id ever sent: all that was acknowledged, nothing that was
    // never sent (the count), and each 5-item request all or nothing (a cut one included).
    let present: BTreeSet<&String> = attempted
        .iter()
        .filter(|id| server.get(&format!("/v1/items/{id}")).0 == 200)
        .collect();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert_eq!(
        server.item_count() as usize,
        present.len(),
        "phantom items: the store holds ids that were never sent"
    );
    assert!(
        cut.load(Ordering::SeqCst) > 0,
        "no kill cut a write in flight: the test proved nothing about crashes"
    );
    let first_ids = (0..next_id).step_by(5);
    for first in first_ids {
        // The ids no delete was sent for.
        let kept: Vec<String> = (first..first + 5)
            .map(|i| format!("c{i}"))
            .filter(|id| !delete_sent.contains(id))
            .collect();
        let stored = kept.iter().filter(|id| present.contains(id)).count();
        assert!(
            stored == 0 || stored == kept.len(),
            "request c{first}..c{} is half stored ({stored} of {})",
            first + 4,
            kept.len()
        );
    }
    for id in acknowledged.iter().step_by(3) {
        let (status, item) = server.get(&format!("/v1/items/{id}"));
        assert_eq!(status, 200, "{id} lost");
        let norm: f64 = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap().powi(2))
            .sum();
        assert!((norm - 1.0).abs() < 1e-3, "{id} has a damaged embedding");
    }
}

/// Kills the server mid-write, then lets the writer notice and stop.
fn kill_mid_write(
    server: Server,
    stop: &AtomicBool,
    writer: std::thread::JoinHandle<usize>,
    next_id: &mut usize,
    attempted: &mut BTreeSet<String>,
) {
    server.kill();
    stop.store(true, Ordering::SeqCst);
    let end = writer.join().unwrap();
    attempted.extend((*next_id..end).map(|i| format!("c{i}")));
    *next_id = end;
}
