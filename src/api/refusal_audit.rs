//! The audit of refusals by the rate limits: a flood of `429`s from one
//! key (a client address or a token) becomes one audit line per
//! [`AUDIT_WINDOW`] with the count, not one line per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use chrono::{DateTime, Utc};
use serde_json::json;

use super::access::{peer_of, public_route};
use crate::audit::{AuditLog, Outcome};
use crate::auth::{request_token, Auth, Caller, Identity};

/// Refusals of one key after its first are counted for this long, then
/// written as one audit line.
pub const AUDIT_WINDOW: Duration = Duration::from_secs(10);
/// Keys with an open audit window at most; refusals of further keys share
/// one window per limit.
const MAX_AUDITED_KEYS: usize = 10_000;
/// What one audit window counts the refusals of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AuditKey {
    /// A client address (IPv6: its /64).
    Ip(IpAddr),
    /// The keyed hash of an `Authorization` value.
    Token(u64),
    /// Any key of this limit, once [`MAX_AUDITED_KEYS`] windows are open.
    Overflow(&'static str),
}

impl AuditKey {
    /// The limit: `ip` or `token` (the `by` label of the metric).
    pub(super) fn limit(&self) -> &'static str {
        match self {
            Self::Ip(_) => "ip",
            Self::Token(_) => "token",
            Self::Overflow(limit) => limit,
        }
    }
}

/// A refused request, as an audit line names it.
struct Sample {
    caller: Option<String>,
    identity: Option<Arc<Identity>>,
    operation: &'static str,
    target: String,
}

/// The refusals of one key since `opened`.
struct Window {
    opened: Instant,
    opened_at: DateTime<Utc>,
    /// Refusals not written yet.
    counted: u64,
    /// The first of them.
    sample: Option<Sample>,
}

impl Window {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            opened_at: Utc::now(),
            counted: 0,
            sample: None,
        }
    }
}

/// Writes `429` refusals to the audit log without letting a flood fill the
/// disk. Per key (client address or token): the first refusal is written
/// at once (`"count": 1`); later ones within the next `window` are only
/// counted, and when the window ends they are written as one line with
/// their `count` and `since` (the window's start), naming the first of
/// them. While a key keeps being refused this repeats, one line per window;
/// a key with no refusal in a whole window is forgotten, so its next
/// refusal is written at once again. So a key costs at most one line per
/// refusal and two per window, and the table at most [`MAX_AUDITED_KEYS`]
/// entries (then further keys share one window per limit, marked
/// `"overflow": true`). Counts still open when the node stops are written
/// then.
pub struct RefusalAudit {
    log: AuditLog,
    auth: Arc<Auth>,
    window: Duration,
    open: Mutex<HashMap<AuditKey, Window>>,
}

impl RefusalAudit {
    pub fn new(log: AuditLog, auth: Arc<Auth>) -> Self {
        Self::with_window(log, auth, AUDIT_WINDOW)
    }

    fn with_window(log: AuditLog, auth: Arc<Auth>, window: Duration) -> Self {
        Self {
            log,
            auth,
            window,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn sample(&self, req: &Request) -> Sample {
        let path = req.uri().path();
        let identity = request_token(req.headers()).and_then(|t| self.auth.tokens()?.verify(t));
        Sample {
            caller: peer_of(req),
            identity,
            operation: public_route(req.method(), path).1,
            target: path.to_string(),
        }
    }

    fn write(&self, key: AuditKey, sample: &Sample, count: u64, since: Option<DateTime<Utc>>) {
        let caller = Caller {
            addr: sample.caller.clone(),
            identity: sample.identity.clone(),
            ..Default::default()
        };
        let mut extra = json!({"limit": key.limit(), "count": count});
        if let Some(since) = since {
            extra["since"] = json!(crate::audit::timestamp(since));
        }
        if matches!(key, AuditKey::Overflow(_)) {
            extra["overflow"] = json!(true);
        }
        self.log.record(
            Some(&caller),
            sample.operation,
            json!(sample.target),
            Outcome::Refused(429, "rate_limit".into()),
            Some(extra),
        );
    }

    /// Writes the refusals `w` counted, if any.
    fn write_window(&self, key: AuditKey, w: &Window) {
        if let (Some(sample), true) = (&w.sample, w.counted > 0) {
            self.write(key, sample, w.counted, Some(w.opened_at));
        }
    }

    /// Notes one refusal of `key`.
    pub(super) fn refused(&self, key: AuditKey, req: &Request) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = if open.len() >= MAX_AUDITED_KEYS && !open.contains_key(&key) {
            AuditKey::Overflow(key.limit())
        } else {
            key
        };
        if let Some(w) = open.get_mut(&key) {
            if w.opened.elapsed() < self.window {
                w.counted += 1;
                if w.sample.is_none() {
                    w.sample = Some(self.sample(req));
                }
                return;
            }
            // Ended, and not written out yet.
            self.write_window(key, w);
            if w.counted > 0 {
                // Still refused: keep counting.
                *w = Window::new();
                w.counted = 1;
                w.sample = Some(self.sample(req));
                return;
            }
        }
        self.write(key, &self.sample(req), 1, None);
        open.insert(key, Window::new());
    }

    /// Writes out the windows that ended and forgets keys that were not
    /// refused in theirs.
    pub(super) fn flush(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|key, w| {
            if w.opened.elapsed() < self.window {
                return true;
            }
            if w.counted == 0 {
                return false;
            }
            self.write_window(*key, w);
            *w = Window::new();
            true
        });
    }
}

impl Drop for RefusalAudit {
    fn drop(&mut self) {
        let open = std::mem::take(self.open.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (key, w) in &open {
            self.write_window(*key, w);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::header;

    use super::*;

    fn audited(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn request(ip: &str, method: &str, path: &str, token: Option<&str>) -> Request {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .extension(ConnectInfo(SocketAddr::new(ip.parse().unwrap(), 4000)));
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn refusals_are_audited_at_once_then_counted_per_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            r#"{"tokens":[{"id":"ci","token":"0123456789abcdef","role":"read"}]}"#,
        )
        .unwrap();
        let rotation = crate::audit::Rotation {
            max_bytes: 1 << 20,
            max_files: 1,
        };
        let dropped = prometheus::IntCounter::new("d", "d").unwrap();
        let log = AuditLog::open(&path, 3, rotation, dropped).unwrap();
        let auth = Arc::new(Auth::load(Some(&tokens), &[]).unwrap());
        let window = Duration::from_millis(200);
        let audit = RefusalAudit::with_window(log.clone(), auth, window);
        let a = AuditKey::Ip("10.0.0.1".parse().unwrap());
        let b = AuditKey::Token(42);
        let lines = || {
            log.sync(Duration::from_secs(5));
            audited(&path)
        };

        // The first refusal of each key is written at once, the rest counted.
        for _ in 0..50 {
            audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        }
        let token = Some("0123456789abcdef");
        audit.refused(b, &request("10.0.0.2", "POST", "/register", token));
        audit.flush();
        let got = lines();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["caller"], "10.0.0.1:4000");
        assert_eq!(got[0]["node"], 3);
        assert_eq!(got[0]["operation"], "list");
        assert_eq!(got[0]["target"], "/services");
        assert_eq!(got[0]["result"], "refused: rate_limit");
        assert_eq!(got[0]["status"], 429);
        assert_eq!(got[0]["limit"], "ip");
        assert_eq!(got[0]["count"], 1);
        assert_eq!(got[0]["token_id"], serde_json::Value::Null);
        assert!(got[0].get("since").is_none());
        assert_eq!(got[1]["limit"], "token");
        assert_eq!(got[1]["token_id"], "ci");
        assert_eq!(got[1]["operation"], "register");

        // The window ends: one line with the count; b, not refused again,
        // is forgotten.
        std::thread::sleep(window);
        audit.flush();
        let got = lines();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[2]["caller"], "10.0.0.1:4000");
        assert_eq!(got[2]["count"], 49);
        assert!(got[2]["since"].as_str().unwrap() >= got[0]["time"].as_str().unwrap());
        assert_eq!(audit.open.lock().unwrap().len(), 1);

        // a is still refused: counted, not written at once; b is new again.
        for _ in 0..5 {
            audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        }
        audit.refused(b, &request("10.0.0.2", "GET", "/services", token));
        assert_eq!(lines().len(), 4);
        // A window that ended is written out by the next refusal too.
        std::thread::sleep(window);
        audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        assert_eq!(lines().len(), 5);
        // What is still counted is written when the node stops.
        drop(audit);
        let got = lines();
        assert_eq!(got.len(), 6, "{got:?}");
        let total: u64 = got
            .iter()
            .filter(|e| e["limit"] == "ip")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 56);
    }

    #[test]
    fn the_audit_table_is_bounded() {
        let audit = RefusalAudit::new(AuditLog::disabled(), Arc::new(Auth::open()));
        for i in 0..(MAX_AUDITED_KEYS as u32 + 10) {
            let ip = IpAddr::from(i.to_be_bytes());
            audit.refused(
                AuditKey::Ip(ip),
                &request(&ip.to_string(), "GET", "/", None),
            );
        }
        let open = audit.open.lock().unwrap();
        assert_eq!(open.len(), MAX_AUDITED_KEYS + 1);
        assert_eq!(open[&AuditKey::Overflow("ip")].counted, 9);
    }
}
