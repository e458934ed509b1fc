//! `strata status`: turns each node's `/admin/status` JSON into one row of a table. Pure:
//! no I/O, so the rendering is unit-tested on sample documents.

use serde_json::Value;

/// One node's line in the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// The node's name (or its admin address when it did not answer).
    pub node: String,
    /// Its roles, comma-separated.
    pub roles: String,
    /// `yes`, or `no: why`.
    pub ready: String,
    /// Config version, and whether the last reload was refused.
    pub version: String,
    /// Log position: the storage role's last LSN, a replica's applied LSN, or an embedded
    /// app's.
    pub lsn: String,
    /// Replication lag: a replica's own, or the worst of a primary's replicas.
    pub lag: String,
    /// Cache hit ratios by role.
    pub hits: String,
    /// Backend / upstream / replica health as `healthy/total`.
    pub backends: String,
}

const HEADER: [&str; 8] = [
    "NODE",
    "ROLES",
    "READY",
    "CONFIG",
    "LSN",
    "LAG",
    "HIT RATIO",
    "BACKENDS",
];

/// The row for a node that answered with its status document.
pub fn row(status: &Value) -> Row {
    let comp = &status["components"];
    let roles = status["roles"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let ready = if status["ready"].as_bool() == Some(true) {
        "yes".to_owned()
    } else {
        let why = status["not_ready"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("");
        format!("no: {}", shorten(why, 40))
    };
    let mut version = status["config"]["version"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    if status["config"]["last_reload"]["applied"].as_bool() == Some(false) {
        version.push_str(" (last reload refused)");
    }
    let storage = &comp["storage"];
    let repl = &storage["replication"];
    let lsn = if repl["role"].as_str() == Some("replica") {
        num(&repl["applied_lsn"])
    } else if !storage["last_lsn"].is_null() {
        num(&storage["last_lsn"])
    } else {
        num(&comp["app"]["storage"]["last_lsn"])
    };
    let lag = if repl["role"].as_str() == Some("replica") {
        format!(
            "{:.1}s ({} entries)",
            repl["lag_seconds"].as_f64().unwrap_or(0.0),
            num(&repl["lag_entries"])
        )
    } else if let Some(rs) = repl["replicas"].as_array().filter(|r| !r.is_empty()) {
        let worst = rs
            .iter()
            .filter_map(|r| r["lag_seconds"].as_f64())
            .fold(0.0_f64, f64::max);
        format!("max {worst:.1}s of {}", rs.len())
    } else {
        "-".to_owned()
    };
    let mut hits = Vec::new();
    if let Some(obj) = comp.as_object() {
        for (name, v) in obj {
            if let Some(r) = find_hit_ratio(v) {
                hits.push(format!("{name} {:.0}%", r * 100.0));
            }
        }
    }
    let mut backends = Vec::new();
    if let Some(b) = comp["balancer"]["backends"].as_array() {
        let up = b
            .iter()
            .filter(|b| b["healthy"] == Value::Bool(true))
            .count();
        backends.push(format!("apps {up}/{}", b.len()));
    }
    if let Some(u) = comp["edge"]["upstreams"].as_array() {
        let up = u
            .iter()
            .filter(|u| u["healthy"] == Value::Bool(true))
            .count();
        backends.push(format!("upstreams {up}/{}", u.len()));
    }
    if let Some(r) = comp["app"]["storage"]["replicas"]
        .as_array()
        .filter(|r| !r.is_empty())
    {
        let up = r.iter().filter(|r| r["ready"] == Value::Bool(true)).count();
        backends.push(format!("replicas {up}/{}", r.len()));
    }
    if comp["app"]["storage"]["kind"].as_str() == Some("remote") {
        let up = comp["app"]["storage"]["connections_up"]
            .as_u64()
            .unwrap_or(0)
            > 0;
        backends.push(format!("primary {}", if up { "up" } else { "down" }));
    }
    Row {
        node: status["node"].as_str().unwrap_or("?").to_owned(),
        roles,
        ready,
        version,
        lsn,
        lag,
        hits: dash_if_empty(hits.join(", ")),
        backends: dash_if_empty(backends.join(", ")),
    }
}

/// The row for a node that did not answer.
pub fn unreachable(label: &str, why: &str) -> Row {
    Row {
        node: label.to_owned(),
        roles: "?".into(),
        ready: format!("no: {}", shorten(why, 40)),
        version: "?".into(),
        lsn: "-".into(),
        lag: "-".into(),
        hits: "-".into(),
        backends: "-".into(),
    }
}

/// Renders rows as an aligned text table with a header.
pub fn render(rows: &[Row]) -> String {
    let cells: Vec<[String; 8]> = std::iter::once(HEADER.map(str::to_owned))
        .chain(rows.iter().map(|r| {
            [
                r.node.clone(),
                r.roles.clone(),
                r.ready.clone(),
                r.version.clone(),
                r.lsn.clone(),
                r.lag.clone(),
                r.hits.clone(),
                r.backends.clone(),
            ]
        }))
        .collect();
    let mut widths = [0usize; 8];
    for line in &cells {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for line in &cells {
        let mut text = String::new();
        for (i, (c, w)) in line.iter().zip(widths).enumerate() {
            if i + 1 == line.len() {
                text.push_str(c);
            } else {
                text.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn find_hit_ratio(v: &Value) -> Option<f64> {
    if let Some(r) = v.get("hit_ratio").and_then(Value::as_f64) {
        return Some(r);
    }
    v.as_object()?.values().find_map(find_hit_ratio)
}

fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_summarise_every_role() {
        let replica = json!({
            "node": "storage-replica-1", "roles": ["storage"], "ready": true, "not_ready": [],
            "config": {"version": "0badf00d", "last_reload": {"applied": false}},
            "components": {"storage": {"last_lsn": 40, "replication": {
                "role": "replica", "applied_lsn": 42, "lag_seconds": 0.25, "lag_entries": 1,
                "replicas": []}}}
        });
        let r = row(&replica);
        assert_eq!(r.lsn, "42");
        assert_eq!(r.lag, "0.2s (1 entries)");
        assert_eq!(r.version, "0badf00d (last reload refused)");
        let primary = json!({
            "node": "p", "roles": ["storage"], "ready": true,
            "config": {"version": "1"},
            "components": {"storage": {"last_lsn": 7, "replication": {"role": "primary",
                "replicas": [{"lag_seconds": 0.0}, {"lag_seconds": 1.5}]}}}
        });
        let r = row(&primary);
        assert_eq!((r.lsn.as_str(), r.lag.as_str()), ("7", "max 1.5s of 2"));
        let edge_lb = json!({
            "node": "e", "roles": ["balancer", "edge"], "ready": false,
            "not_ready": ["balancer: no healthy backend"],
            "config": {"version": "2"},
            "components": {
                "edge": {"hit_ratio": 0.5, "upstreams": [{"healthy": true}, {"healthy": false}]},
                "balancer": {"backends": [{"healthy": true}, {"healthy": true}, {"healthy": false}]},
                "app": {"storage": {"kind": "remote", "connections_up": 2,
                    "replicas": [{"ready": true}, {"ready": false}]}}
            }
        });
        let r = row(&edge_lb);
        assert_eq!(r.ready, "no: balancer: no healthy backend");
        assert_eq!(r.hits, "edge 50%");
        assert_eq!(
            r.backends,
            "apps 2/3, upstreams 1/2, replicas 1/2, primary up"
        );
        let table = render(&[r, unreachable("127.0.0.1:9", "connection refused")]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE"));
        let col = lines[0].find("ROLES").unwrap();
        assert_eq!(&lines[1][col..col + 12], "balancer,edg");
        assert!(lines[2].contains("no: connection refused"));
    }
}
