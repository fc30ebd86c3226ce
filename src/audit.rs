//! The audit log (`--audit-log FILE`): one JSON object per line for every
//! mutation a node performs or forwards (register, deregister, expiry
//! rounds, membership changes) and every request it refuses (401, 403;
//! 429s are counted per client in windows, see `api::limits`).
//!
//! Requests never wait for the disk: an event is formatted on the request's
//! task and handed to a dedicated writer thread through a bounded queue; if
//! the queue is full the event is dropped and counted in
//! `registry_audit_dropped_total`. The writer appends to FILE and, when FILE
//! would grow past `max_bytes`, renames it to `FILE.1` (shifting `FILE.1` to
//! `FILE.2` and so on, keeping `max_files` old files) and starts a new FILE.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use prometheus::IntCounter;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::raft::NodeId;

/// Events that may wait for the writer at once.
pub const QUEUE: usize = 8192;

enum Msg {
    Line(String),
    /// Flush, then say so.
    Sync(std::sync::mpsc::Sender<()>),
}

/// Where audit events go; cheap to clone. [`AuditLog::disabled`] drops them.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    node: NodeId,
    tx: SyncSender<Msg>,
    dropped: IntCounter,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

/// How the file rotates.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_bytes: u64,
    pub max_files: usize,
}

/// The outcome written in `result`.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok,
    /// An HTTP status the operation ended with (not a refusal).
    Status(u16),
    /// Refused by the token or secret checks: status and reason.
    Refused(u16, String),
}

impl AuditLog {
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens (creates) the file and starts the writer thread.
    pub fn open(
        path: &Path,
        node: NodeId,
        rotation: Rotation,
        dropped: IntCounter,
    ) -> Result<Self, String> {
        if rotation.max_bytes == 0 {
            return Err("--audit-log-max-bytes must be positive".into());
        }
        let file = open_append(path)
            .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = sync_channel(QUEUE);
        let writer = Writer {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            size,
            rotation,
            failing: false,
            dropped: dropped.clone(),
        };
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("cannot start the audit log writer: {e}"))?;
        Ok(Self {
            inner: Some(Arc::new(Inner { node, tx, dropped })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one event; never blocks.
    pub fn record(
        &self,
        caller: Option<&Caller>,
        operation: &str,
        target: Value,
        outcome: Outcome,
        extra: Option<Value>,
    ) {
        let Some(inner) = &self.inner else { return };
        let (result, status) = match &outcome {
            Outcome::Ok => (json!("ok"), Value::Null),
            Outcome::Status(s) => (json!(s), json!(s)),
            Outcome::Refused(s, reason) => (json!(format!("refused: {reason}")), json!(s)),
        };
        let mut event = json!({
            "time": timestamp(Utc::now()),
            "node": inner.node,
            "caller": caller.and_then(|c| c.addr.clone()),
            "token_id": caller.and_then(|c| c.token_id()),
            "operation": operation,
            "target": target,
            "result": result,
        });
        if !status.is_null() {
            event["status"] = status;
        }
        if let Some(via) = caller.and_then(|c| c.via) {
            event["via"] = json!(via);
        }
        if let Some(Value::Object(extra)) = extra {
            if let Value::Object(map) = &mut event {
                map.extend(extra);
            }
        }
        let mut line = event.to_string();
        line.push('\n');
        match inner.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inner.dropped.inc();
            }
        }
    }

    /// Waits (blocking, at most `timeout`) until everything queued so far
    /// is written, flushed and fsynced. For a clean stop.
    pub fn sync(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        if inner.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }
}

/// A time as the audit log writes it: RFC 3339 UTC, milliseconds.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    rotation: Rotation,
    /// The last write failed (logged once per failing streak).
    failing: bool,
    dropped: IntCounter,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            // Flush whenever the queue runs dry, so the file is current.
            let msg = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.flush();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            self.handle(msg);
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            self.flush();
        }
        self.flush();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => self.write(&line),
            Msg::Sync(done) => {
                self.flush();
                // A clean stop: what the log holds survives power loss too.
                if let Err(e) = self.out.get_ref().sync_data() {
                    self.failed("cannot fsync the audit log", &e);
                }
                let _ = done.send(());
            }
        }
    }

    fn write(&mut self, line: &str) {
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.rotation.max_bytes {
            if let Err(e) = self.rotate() {
                self.failed("cannot rotate the audit log", &e);
            }
        }
        match self.out.write_all(line.as_bytes()) {
            Ok(()) => {
                self.size += len;
                self.failing = false;
            }
            Err(e) => {
                self.dropped.inc();
                self.failed("cannot write the audit log", &e);
            }
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.out.flush() {
            self.failed("cannot flush the audit log", &e);
        }
    }

    fn failed(&mut self, what: &str, e: &std::io::Error) {
        if !self.failing {
            tracing::error!(path = %self.path.display(), error = %e, "{what}");
        }
        self.failing = true;
    }

    /// FILE → FILE.1 → FILE.2 ...; the oldest beyond `max_files` goes.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let keep = self.rotation.max_files;
        if keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, keep));
            for n in (1..keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.out = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn events_are_json_lines_and_the_file_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AuditLog::open(
            &path,
            7,
            Rotation {
                max_bytes: 600,
                max_files: 2,
            },
            dropped.clone(),
        )
        .unwrap();
        let caller = Caller {
            addr: Some("10.0.0.1:5000".into()),
            ..Default::default()
        };
        log.record(
            Some(&caller),
            "register",
            json!("payments/10.0.0.1:80"),
            Outcome::Ok,
            None,
        );
        log.record(
            None,
            "register",
            json!("orders/x"),
            Outcome::Refused(403, "forbidden".into()),
            None,
        );
        log.sync(Duration::from_secs(5));
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["node"], 7);
        assert_eq!(got[0]["caller"], "10.0.0.1:5000");
        assert_eq!(got[0]["token_id"], Value::Null);
        assert_eq!(got[0]["result"], "ok");
        assert!(got[0]["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(got[1]["result"], "refused: forbidden");
        assert_eq!(got[1]["status"], 403);
        for _ in 0..20 {
            log.record(None, "deregister", json!("s"), Outcome::Status(404), None);
        }
        log.sync(Duration::from_secs(5));
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 600);
        let total: usize = [path.clone(), rotated(&path, 1), rotated(&path, 2)]
            .iter()
            .map(|p| lines(p).len())
            .sum();
        assert!(total < 22, "old files beyond max_files are removed");
        assert_eq!(dropped.get(), 0);
    }
}
