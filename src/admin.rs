//! The `cluster` and `snapshot` subcommands: operator requests to `/cluster/*`,
//! printed as tables and sentences. Each tries the given nodes until one answers.

use std::time::Duration;

use serde_json::{json, Value};

use std::path::Path;

use crate::config::{ClusterAction, ClusterArgs, RemoteArgs, SnapshotAction, SnapshotArgs};
use crate::raft::network::SECRET_HEADER;
use crate::raft::state_machine::backup;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no registry node answered ({0})")]
    Unreachable(String),
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
    #[error("{0}")]
    Config(String),
}

/// Runs one `cluster` action and returns what to print.
pub async fn run(args: &ClusterArgs) -> Result<String, AdminError> {
    let (method, path, body) = match &args.action {
        ClusterAction::Status => (reqwest::Method::GET, "/cluster/status".to_string(), None),
        ClusterAction::Add { id, addr, wait } => (
            reqwest::Method::POST,
            "/cluster/nodes".to_string(),
            Some(json!({"id": id, "addr": addr, "wait_seconds": wait})),
        ),
        ClusterAction::Promote { id, wait } => (
            reqwest::Method::POST,
            format!("/cluster/nodes/{id}/promote"),
            Some(json!({"wait_seconds": wait})),
        ),
        ClusterAction::Remove { id, force } => (
            reqwest::Method::DELETE,
            if *force {
                format!("/cluster/nodes/{id}?force=true")
            } else {
                format!("/cluster/nodes/{id}")
            },
            None,
        ),
    };
    // An addition waits for the node to catch up, then for the commit.
    let wait = match &args.action {
        ClusterAction::Add { wait, .. } | ClusterAction::Promote { wait, .. } => {
            Duration::from_secs(*wait + 60)
        }
        _ => Duration::from_secs(90),
    };
    // Any node passes a change on to the leader: a `503` to a change is its
    // answer (e.g. the node did not catch up), not a reason to ask the next
    // node, which would start the change again.
    let next_on_503 = matches!(args.action, ClusterAction::Status);
    let resp = ask(
        &args.remote,
        wait,
        method,
        &path,
        body.as_ref(),
        next_on_503,
    )
    .await?;
    let value: Value = resp.json().await.unwrap_or(Value::Null);
    let said = match args.action {
        ClusterAction::Status => return Ok(status_table(&value)),
        ClusterAction::Add { .. } | ClusterAction::Promote { .. } => added(&value),
        ClusterAction::Remove { .. } => removed(&value),
    };
    // The sentence, then the membership as it is now, in `status`'s table.
    let status = ask(
        &args.remote,
        Duration::from_secs(10),
        reqwest::Method::GET,
        "/cluster/status",
        None,
        true,
    )
    .await;
    let table = match status {
        Ok(resp) => match resp.json::<Value>().await {
            Ok(v) => status_table(&v),
            Err(e) => format!("(cluster status unreadable: {e})\n"),
        },
        Err(e) => format!("(cluster status unavailable: {e})\n"),
    };
    Ok(format!("{said}\n{table}"))
}

/// Sends the request to each `--registry` node in turn until one answers
/// (and, with `next_on_503`, answers other than `503`): its successful
/// answer, or its refusal as [`AdminError::Refused`].
async fn ask(
    remote: &RemoteArgs,
    timeout: Duration,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    next_on_503: bool,
) -> Result<reqwest::Response, AdminError> {
    let http = client(remote, timeout)?;
    let mut last_error = String::from("no --registry given");
    for base in &remote.registry {
        let mut req = request(&http, remote, method.clone(), base, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                last_error = format!("{base}: {e}");
                continue;
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        let message = value["message"].as_str().unwrap_or("").to_string();
        if status.as_u16() == 503 && next_on_503 {
            last_error = format!("{base}: {message}");
            continue;
        }
        return Err(AdminError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    Err(AdminError::Unreachable(last_error))
}

/// An HTTP client for the cluster's nodes, with the given timeout.
fn client(remote: &RemoteArgs, timeout: Duration) -> Result<reqwest::Client, AdminError> {
    let tls = crate::tls::ClientTls::from_files(remote.tls_ca.as_deref(), None, None)
        .map_err(AdminError::Config)?;
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2));
    tls.apply(builder)
        .map_err(AdminError::Config)?
        .build()
        .map_err(|e| AdminError::Unreachable(e.to_string()))
}

/// A request to `path` on node `base`, with the secret or token.
fn request(
    http: &reqwest::Client,
    remote: &RemoteArgs,
    method: reqwest::Method,
    base: &str,
    path: &str,
) -> reqwest::RequestBuilder {
    let mut req = http.request(method, format!("{}{path}", base.trim_end_matches('/')));
    if let Some(s) = &remote.cluster_secret {
        req = req.header(SECRET_HEADER, s.expose());
    }
    if let Some(t) = &remote.token {
        req = req.bearer_auth(t.expose());
    }
    req
}

/// Runs one `snapshot` action and returns what to print.
pub async fn snapshot(args: &SnapshotArgs) -> Result<String, AdminError> {
    let file = match &args.action {
        SnapshotAction::Save { file } => file,
        SnapshotAction::Restore { file, data_dir } => return restore(file, data_dir),
    };
    // Taking a backup of a million instances takes seconds; sending it, more.
    let timeout = Duration::from_secs(600);
    let resp = ask(
        &args.remote,
        timeout,
        reqwest::Method::GET,
        "/cluster/snapshot",
        None,
        true,
    )
    .await?;
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| AdminError::Unreachable(format!("the backup was cut off: {e}")))?;
    let (header, _) = backup::decode(&bytes)
        .map_err(|e| AdminError::Config(format!("the node sent a bad backup: {e}")))?;
    // Checked whole before it is written; `file` is then either as it was
    // or the complete backup.
    crate::raft::durable::write_file(file, &bytes)
        .map_err(|e| AdminError::Config(format!("writing {}: {e}", file.display())))?;
    Ok(format!(
        "saved {}: index {} (term {}) from node {}, {} services, {} instances, {} bytes, sha256 {}\n",
        file.display(),
        header.index,
        header.term,
        header.taken_by,
        header.services,
        header.instances,
        bytes.len(),
        backup::checksum_hex(&bytes)
    ))
}

/// `snapshot restore`: checks the backup whole, then copies it into the
/// empty (or new) data directory as [`backup::RESTORE_FILE`], synced and
/// renamed into place; the node installs it when it first starts there.
fn restore(file: &Path, data_dir: &Path) -> Result<String, AdminError> {
    let cfg = |m: String| AdminError::Config(m);
    let bytes = std::fs::read(file).map_err(|e| cfg(format!("reading {}: {e}", file.display())))?;
    let (header, _) =
        backup::decode(&bytes).map_err(|e| cfg(format!("{}: {e}", file.display())))?;
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(cfg(format!(
                    "{} is not empty: a restore seeds an empty data directory (move this one aside first)",
                    data_dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| cfg(format!("creating {}: {e}", data_dir.display())))?;
        }
        Err(e) => return Err(cfg(format!("reading {}: {e}", data_dir.display()))),
    }
    let target = data_dir.join(backup::RESTORE_FILE);
    crate::raft::durable::write_file(&target, &bytes)
        .map_err(|e| cfg(format!("writing {}: {e}", target.display())))?;
    Ok(format!(
        "{} seeded from {}: index {} (term {}, taken by node {}), {} services, {} instances, sha256 {}\n\
         Start a node on it with --peers (the same list on every node restored from this file), \
         or alone and let others --join it. Every instance's TTL starts again when the new \
         cluster's first leader is elected.\n",
        data_dir.display(),
        file.display(),
        header.index,
        header.term,
        header.taken_by,
        header.services,
        header.instances,
        backup::checksum_hex(&bytes)
    ))
}

/// The answer to `cluster add`, as a sentence.
fn added(v: &Value) -> String {
    let (id, addr) = (cell(&v["id"]), cell(&v["addr"]));
    let voters = ids(&v["voters"]);
    if v["voter"] == json!(false) {
        format!("node {id} at {addr} is a learner (a read replica; voters: {voters})\n")
    } else if v["changed"] == json!(false) {
        format!("node {id} at {addr} is already a voter; nothing changed (voters: {voters})\n")
    } else {
        format!("node {id} at {addr} caught up and is a voter now (voters: {voters})\n")
    }
}

/// The answer to `cluster remove`, as a sentence.
fn removed(v: &Value) -> String {
    format!(
        "node {} removed (voters: {})\n",
        cell(&v["removed"]),
        ids(&v["voters"])
    )
}

fn ids(v: &Value) -> String {
    match v.as_array() {
        Some(a) => a.iter().map(cell).collect::<Vec<_>>().join(", "),
        None => cell(v),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `cluster status` as a table.
pub fn status_table(v: &Value) -> String {
    let mut out = format!(
        "leader {}  term {}  last log index {}  committed {}\n",
        cell(&v["leader_id"]),
        cell(&v["term"]),
        cell(&v["last_log_index"]),
        cell(&v["committed"])
    );
    if v["membership_changing"] == json!(true) {
        out.push_str("a membership change is in progress: it completes once enough voters of both the old and the new set answer\n");
    }
    let header = [
        "ID",
        "ADDRESS",
        "ROLE",
        "VOTER",
        "REACHABLE",
        "MATCHED",
        "LAG",
        "LAST CONTACT",
    ];
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for m in v["members"].as_array().into_iter().flatten() {
        let contact = match &m["last_contact_ms"] {
            Value::Number(n) => format!("{n} ms"),
            other => cell(other),
        };
        rows.push(vec![
            cell(&m["id"]),
            cell(&m["addr"]),
            cell(&m["role"]),
            cell(&m["voter"]),
            cell(&m["reachable"]),
            cell(&m["matched_index"]),
            cell(&m["lag"]),
            contact,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_member() {
        let v = json!({"leader_id": 1, "term": 3, "last_log_index": 9, "committed": 9, "members": [
            {"id": 1, "addr": "a:1", "role": "leader", "voter": true, "reachable": true, "matched_index": 9, "lag": 0, "last_contact_ms": 0},
            {"id": 2, "addr": "b:2", "role": null, "voter": true, "reachable": false, "matched_index": 4, "lag": 5, "last_contact_ms": null},
        ]});
        let t = status_table(&v);
        assert!(t.starts_with("leader 1  term 3"));
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("b:2"));
        assert!(t.lines().nth(3).unwrap().contains("no"));
    }

    #[test]
    fn changes_print_as_sentences() {
        let v =
            json!({"id": 6, "addr": "h:6", "voter": true, "changed": true, "voters": [1, 2, 6]});
        assert_eq!(
            added(&v),
            "node 6 at h:6 caught up and is a voter now (voters: 1, 2, 6)\n"
        );
        let v = json!({"id": 2, "addr": "h:2", "voter": true, "changed": false, "voters": [1, 2]});
        assert!(added(&v).contains("already a voter; nothing changed"));
        assert_eq!(
            removed(&json!({"removed": 3, "voters": [1, 2]})),
            "node 3 removed (voters: 1, 2)\n"
        );
    }
}
