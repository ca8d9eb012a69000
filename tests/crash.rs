//! Crash safety in the style of Qdrant's crasher: SIGKILL the server while a client upserts,
//! restart, and check that every acknowledged write is there — no loss, no phantom items.
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
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (url, stop, acknowledged, cut) = (
                server.url.clone(),
                stop.clone(),
                acknowledged.clone(),
                cut.clone(),
            );
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
        let stored = (first..first + 5)
            .filter(|i| present.contains(&format!("c{i}")))
            .count();
        assert!(
            stored == 0 || stored == 5,
            "request c{first}..c{} is half stored ({stored} of 5)",
            first + 4
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
