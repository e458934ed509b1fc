//! Crash durability: many concurrent writers, `kill -9` at a random moment, restart, and
//! every acknowledged write must be there with its acknowledged content. Several cycles.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, Node};
use rand::Rng;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_write() {
    let mut node = Node::start_app("");
    // key -> last acknowledged sequence number for that key
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let mut total_acked = 0usize;
    for cycle in 0..4 {
        let url = node.url();
        let mut writers = Vec::new();
        for w in 0..16 {
            let acked = acked.clone();
            let url = url.clone();
            writers.push(tokio::spawn(async move {
                let c = client();
                for seq in 0u64.. {
                    // Half the writers create new keys, half overwrite one hot key each.
                    let key = if w % 2 == 0 {
                        format!("c{cycle}-w{w}-{seq}")
                    } else {
                        format!("hot-w{w}")
                    };
                    let r = c
                        .put(format!("{url}/api/v1/crash/{key}"))
                        .json(&json!({"cycle": cycle, "w": w, "seq": seq, "pad": "x".repeat(200)}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            acked.lock().unwrap().insert(key, seq + cycle * 1_000_000);
                        }
                        _ => return,
                    }
                }
            }));
        }
        let wait = rand::thread_rng().gen_range(300..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        node = tokio::task::spawn_blocking(move || node.restart_after_kill9())
            .await
            .unwrap();
        for w in writers {
            let _ = w.await;
        }
        let snapshot = acked.lock().unwrap().clone();
        assert!(
            snapshot.len() > total_acked,
            "cycle {cycle} acknowledged nothing new"
        );
        total_acked = snapshot.len();
        let c = client();
        for (key, seq) in &snapshot {
            let r = c
                .get(format!("{}/api/v1/crash/{key}", node.url()))
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                200,
                "acknowledged {key} lost after kill -9 in cycle {cycle}"
            );
            let v: Value = r.json().await.unwrap();
            let stored = v["seq"].as_u64().unwrap() + v["cycle"].as_u64().unwrap() * 1_000_000;
            if key.starts_with("hot-") {
                assert!(
                    stored >= *seq,
                    "{key}: acknowledged seq {seq} but found older {stored}"
                );
            } else {
                assert_eq!(
                    stored, *seq,
                    "{key}: content differs from what was acknowledged"
                );
            }
        }
        // Records and log agree: the status page counts what a full listing returns.
        let status: Value = c
            .get(format!("{}/admin/status", node.admin_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let records = status["components"]["app"]["storage"]["records"]
            .as_u64()
            .unwrap();
        let mut listed = 0u64;
        let mut after: Option<String> = None;
        loop {
            let mut u = format!("{}/api/v1/crash?limit=1000", node.url());
            if let Some(a) = &after {
                u.push_str(&format!("&after={a}"));
            }
            let page: Value = c.get(&u).send().await.unwrap().json().await.unwrap();
            listed += page["items"].as_array().unwrap().len() as u64;
            match page["next"].as_str() {
                Some(n) => after = Some(n.to_owned()),
                None => break,
            }
        }
        assert_eq!(
            records, listed,
            "record count and listing disagree after restart"
        );
    }
}
