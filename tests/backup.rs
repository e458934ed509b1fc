//! Backups: `GET /admin/backup` on a replica while the primary takes writes, then
//! `strata restore` into a new data directory, and a node started on it finds every
//! record — and a consistent cut of the writes that raced the backup. Damaged files are
//! refused and leave nothing behind.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app_config, bin, client, Node};
use serde_json::{json, Value};

const SECRET: &str = "backup-test-secret-0123456789";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn restore(file: &Path, data_dir: &Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["restore", "--from"])
        .arg(file)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run strata restore");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn backup_of_a_replica_under_writes_restores_every_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = client();

    // Primary: app + storage on one engine. Replica: storage following it.
    let (app_port, storage_port) = (free_port(), free_port());
    let pdir = tmp.path().join("primary");
    std::fs::create_dir_all(&pdir).expect("mkdir");
    let primary = Node::start_with(
        &pdir,
        &format!(
            "[node]\nname = \"primary\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n\n\
             [app]\nlisten = \"127.0.0.1:{app_port}\"\n\n[storage]\nlisten = \"127.0.0.1:{storage_port}\"\n",
            pdir.join("data").display()
        ),
    );
    let rdir = tmp.path().join("replica");
    std::fs::create_dir_all(&rdir).expect("mkdir");
    let replica = Node::start_with(
        &rdir,
        &format!(
            "[node]\nname = \"replica\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n\n\
             [storage]\nlisten = \"127.0.0.1:{}\"\nmode = \"replica\"\nfollow = \"127.0.0.1:{storage_port}\"\n",
            rdir.join("data").display(),
            free_port()
        ),
    );

    // Records: created, some updated, some deleted.
    let api = format!("{}/api/v1", primary.url());
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..120 {
        let v = json!({ "i": i, "text": format!("note {i}") });
        let r = c
            .put(format!("{api}/notes/n{i:03}"))
            .json(&v)
            .send()
            .await
            .expect("put");
        assert!(r.status().is_success());
        expected.insert(format!("n{i:03}"), v);
    }
    for i in (0..120).step_by(7) {
        let v = json!({ "i": i, "updated": true });
        c.put(format!("{api}/notes/n{i:03}"))
            .json(&v)
            .send()
            .await
            .expect("update");
        expected.insert(format!("n{i:03}"), v);
    }
    for i in (3..120).step_by(11) {
        let r = c
            .delete(format!("{api}/notes/n{i:03}"))
            .send()
            .await
            .expect("delete");
        assert!(r.status().is_success());
        expected.remove(&format!("n{i:03}"));
    }

    // The replica catches up.
    let target = primary.status().await["components"]["storage"]["last_lsn"]
        .as_u64()
        .expect("lsn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica.status().await["components"]["storage"]["replication"]["applied_lsn"]
        .as_u64()
        .unwrap_or(0)
        < target
    {
        assert!(Instant::now() < deadline, "replica did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Writes keep coming while the backup is taken: live/l0000, l0001, … in order.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, c, api) = (stop.clone(), c.clone(), api.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .put(format!("{api}/live/l{i:04}"))
                    .json(&json!({ "seq": i }))
                    .send()
                    .await
                    .expect("live put");
                assert!(r.status().is_success());
                i += 1;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = c
        .get(format!("{}/admin/backup", replica.admin_url()))
        .send()
        .await
        .expect("backup");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let backup = resp.bytes().await.expect("backup body");
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(written > 0);

    let file = tmp.path().join("replica.strata-backup");
    std::fs::write(&file, &backup).expect("write backup");

    // Damaged copies are refused and leave no data directory behind.
    let truncated = tmp.path().join("truncated");
    std::fs::write(&truncated, &backup[..backup.len() - 40]).expect("write");
    let mut flipped = backup.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let altered = tmp.path().join("altered");
    std::fs::write(&altered, &flipped).expect("write");
    let not_a_backup = tmp.path().join("not-a-backup");
    std::fs::write(&not_a_backup, b"hello, world\n").expect("write");
    for bad in [&truncated, &altered, &not_a_backup] {
        let dir = tmp.path().join("bad-restore");
        let (ok, _, err) = restore(bad, &dir);
        assert!(!ok, "{} restored", bad.display());
        assert!(err.contains("not a valid backup"), "{err}");
        assert!(!dir.exists(), "a failed restore left {}", dir.display());
    }
    // A restore never writes over existing data.
    let (ok, _, err) = restore(&file, &pdir.join("data"));
    assert!(!ok && err.contains("not empty"), "{err}");

    // The good one restores.
    let rroot = tmp.path().join("restored");
    std::fs::create_dir_all(&rroot).expect("mkdir");
    let (ok, out, err) = restore(&file, &rroot.join("data"));
    assert!(ok, "restore failed: {err}");
    let report: Value = serde_json::from_str(&out).expect("restore report");
    let lsn = report["lsn"].as_u64().expect("lsn");
    assert!(lsn >= target, "{report}");

    // A node on the restored data finds every record, and a consistent cut of the racing
    // writes: exactly the first k of them, k fixed by the backup's LSN.
    let restored = Node::start_with(&rroot, &app_config(&rroot, ""));
    let rapi = format!("{}/api/v1", restored.url());
    for i in 0..120 {
        let id = format!("n{i:03}");
        let r = c
            .get(format!("{rapi}/notes/{id}"))
            .send()
            .await
            .expect("get");
        match expected.get(&id) {
            Some(v) => {
                assert_eq!(r.status(), 200, "{id} missing after restore");
                assert_eq!(&r.json::<Value>().await.expect("json"), v, "{id}");
            }
            None => assert_eq!(r.status(), 404, "deleted {id} came back"),
        }
    }
    let live: Value = c
        .get(format!("{rapi}/live?limit=1000"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let items = live["items"].as_array().expect("items");
    for (n, item) in items.iter().enumerate() {
        assert_eq!(item["id"], format!("l{n:04}"), "a gap in the racing writes");
        assert_eq!(item["value"]["seq"], n);
    }
    assert!(items.len() as u32 <= written);
    let st = restored.status().await;
    assert_eq!(st["components"]["app"]["storage"]["last_lsn"], lsn);
    assert_eq!(
        st["components"]["app"]["storage"]["records"],
        report["records"]
    );
    assert_eq!(
        report["records"].as_u64(),
        Some((expected.len() + items.len()) as u64)
    );

    // Restored again, the same file makes a replica that resumes from the backup's LSN
    // (the primary still holds the log from there) instead of needing a snapshot.
    let r2 = tmp.path().join("restored-replica");
    std::fs::create_dir_all(&r2).expect("mkdir");
    let (ok, _, err) = restore(&file, &r2.join("data"));
    assert!(ok, "{err}");
    let follower = Node::start_with(
        &r2,
        &format!(
            "[node]\nname = \"restored-replica\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\ncluster_secret = \"{SECRET}\"\n\n\
             [storage]\nlisten = \"127.0.0.1:{}\"\nmode = \"replica\"\nfollow = \"127.0.0.1:{storage_port}\"\n",
            r2.join("data").display(),
            free_port()
        ),
    );
    let head = primary.status().await["components"]["storage"]["last_lsn"]
        .as_u64()
        .expect("lsn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while follower.status().await["components"]["storage"]["replication"]["applied_lsn"]
        .as_u64()
        .unwrap_or(0)
        < head
    {
        assert!(
            Instant::now() < deadline,
            "restored replica did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = follower.metrics_text().await;
    assert!(
        metrics.contains("strata_replication_snapshots_installed_total 0"),
        "the restored replica needed a snapshot"
    );
}

#[tokio::test]
async fn backup_needs_a_node_with_data_and_the_admin_token() {
    // A balancer-only node has no data.
    let tmp = tempfile::tempdir().expect("tempdir");
    let lb = Node::start_with(
        tmp.path(),
        &format!(
            "[node]\nname = \"lb\"\ndata_dir = \"{}\"\nadmin = \"127.0.0.1:0\"\n\n[balancer]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:{}\"]\n",
            tmp.path().join("data").display(),
            free_port()
        ),
    );
    let r = client()
        .get(format!("{}/admin/backup", lb.admin_url()))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);

    // With tokens, the backup is admin-only.
    let node = Node::start_app(
        "[[app.tokens]]\nname = \"ops\"\nscopes = [\"admin\"]\nvalue = \"backup-admin-token\"\n\n\
         [[app.tokens]]\nname = \"reader\"\nscopes = [\"read\"]\nvalue = \"backup-read-token\"\n",
    );
    let c = client();
    let url = format!("{}/admin/backup", node.admin_url());
    assert_eq!(c.get(&url).send().await.expect("get").status(), 401);
    let r = c
        .get(&url)
        .bearer_auth("backup-read-token")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);
    let r = c
        .get(&url)
        .bearer_auth("backup-admin-token")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert!(body.starts_with(b"STRATA-BACKUP-1\n"));
}
