//! API tokens: the token file, roles, service-name prefixes, and the checks
//! the HTTP layer makes with them.
//!
//! The file (`--tokens FILE`) is JSON:
//!
//! ```json
//! {"tokens": [
//!   {"id": "deployer", "token": "a-long-random-string", "role": "write", "services": ["payments", "osint_"]},
//!   {"id": "dashboard", "token": "another-long-string", "role": "read"},
//!   {"id": "ops", "token": "yet-another-string!", "role": "admin"}
//! ]}
//! ```
//!
//! Only the SHA-256 of each token is kept in memory. A request's token is
//! hashed, looked up by its hash, and the hashes are compared again in
//! constant time. Nothing here ever formats a token: [`Secret`] and the
//! file's entries print as `"<redacted>"`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::raft::NodeId;

/// Shortest token the file may hold.
pub const MIN_TOKEN_LEN: usize = 16;

/// A secret string (API token, cluster secret) that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// The secret itself: only for sending it or comparing it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(Arc::from(s))
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(Arc::from(s))
    }
}

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `GET /services`, `GET /services/{name}`, `GET /metrics`.
    Read,
    /// Read, plus register, heartbeat and deregister (optionally only for
    /// some service-name prefixes).
    Write,
    /// Everything, including the `/cluster/*` routes.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

/// Who a valid token belongs to: everything about it but the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub role: Role,
    /// Service-name prefixes a write token is limited to; `None`: any.
    pub services: Option<Vec<String>>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `401`: no `Authorization: Bearer` header.
    MissingToken,
    /// `401`: a token that is not in the file.
    InvalidToken,
    /// `403`: the token's role is too low.
    Role { needed: Role },
    /// `403`: a write token outside its service prefixes.
    Service { service: String },
}

impl Refusal {
    /// The `reason` label of `registry_auth_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::Role { .. } => "role",
            Self::Service { .. } => "service",
        }
    }

    /// `401` or `403`.
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingToken | Self::InvalidToken => 401,
            _ => 403,
        }
    }

    /// A message for the client (never contains the token).
    pub fn message(&self, identity: Option<&Identity>) -> String {
        match (self, identity) {
            (Self::MissingToken, _) => {
                "this request needs an API token: send Authorization: Bearer <token>".into()
            }
            (Self::InvalidToken, _) => "the API token is not valid".into(),
            (Self::Role { needed }, Some(i)) => format!(
                "token '{}' has role '{}'; this request needs role '{}'",
                i.id,
                i.role.as_str(),
                needed.as_str()
            ),
            (Self::Role { needed }, None) => {
                format!("this request needs role '{}'", needed.as_str())
            }
            (Self::Service { service }, Some(i)) => format!(
                "token '{}' may not change service '{service}' (allowed prefixes: {})",
                i.id,
                i.services
                    .as_deref()
                    .map(|s| s.join(", "))
                    .unwrap_or_default()
            ),
            (Self::Service { service }, None) => {
                format!("this token may not change service '{service}'")
            }
        }
    }
}

impl Identity {
    /// May this identity do something that needs `needed`?
    pub fn require(&self, needed: Role) -> Result<(), Refusal> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(Refusal::Role { needed })
        }
    }

    /// May this identity register, renew or deregister `service`?
    pub fn may_write(&self, service: &str) -> Result<(), Refusal> {
        self.require(Role::Write)?;
        match (&self.services, self.role) {
            (Some(prefixes), Role::Write) if !prefixes.iter().any(|p| service.starts_with(p)) => {
                Err(Refusal::Service {
                    service: service.to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// One entry of the token file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    id: String,
    token: String,
    role: Role,
    #[serde(default)]
    services: Option<Vec<String>>,
}

impl fmt::Debug for FileEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileEntry")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("services", &self.services)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<FileEntry>,
}

type Digest = [u8; 32];

fn digest(token: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The valid tokens, by the SHA-256 of each.
pub struct Tokens {
    by_digest: HashMap<Digest, Arc<Identity>>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.by_digest.values().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        f.debug_struct("Tokens").field("ids", &ids).finish()
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {reason}")]
pub struct TokenFileError {
    pub path: String,
    pub reason: String,
}

impl Tokens {
    /// Reads and checks a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let fail = |reason: String| TokenFileError {
            path: path.display().to_string(),
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        Self::parse(&text).map_err(fail)
    }

    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = serde_json::from_str(text).map_err(|e| {
            format!(
                "not a valid token file ({e}); expected {{\"tokens\":[{{\"id\",\"token\",\"role\":\"read\"|\"write\"|\"admin\",\"services\"?:[prefix,..]}}]}}"
            )
        })?;
        if file.tokens.is_empty() {
            return Err("it lists no tokens".into());
        }
        let mut ids = HashSet::new();
        let mut by_digest = HashMap::new();
        for (n, e) in file.tokens.into_iter().enumerate() {
            let n = n + 1;
            let id = e.id.trim();
            if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                return Err(format!(
                    "entry {n}: the id must be 1-128 characters without control characters"
                ));
            }
            if !ids.insert(id.to_string()) {
                return Err(format!("entry {n}: the id '{id}' appears twice"));
            }
            if e.token.is_empty() {
                return Err(format!("entry {n} ('{id}'): the token is empty"));
            }
            if e.token.chars().count() < MIN_TOKEN_LEN {
                return Err(format!(
                    "entry {n} ('{id}'): the token is shorter than {MIN_TOKEN_LEN} characters"
                ));
            }
            if !e.token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "entry {n} ('{id}'): the token may contain only visible ASCII characters (no spaces)"
                ));
            }
            if let Some(s) = &e.services {
                if e.role != Role::Write {
                    return Err(format!(
                        "entry {n} ('{id}'): 'services' limits write tokens only; remove it from this {} token",
                        e.role.as_str()
                    ));
                }
                if s.is_empty() {
                    return Err(format!(
                        "entry {n} ('{id}'): 'services' is empty; leave it out to allow every service"
                    ));
                }
                if let Some(p) = s.iter().find(|p| {
                    p.is_empty()
                        || !p
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                }) {
                    return Err(format!(
                        "entry {n} ('{id}'): service prefix '{p}' must be 1 or more of [A-Za-z0-9_.-]"
                    ));
                }
            }
            let identity = Arc::new(Identity {
                id: id.to_string(),
                role: e.role,
                services: e.services,
            });
            if by_digest
                .insert(digest(e.token.as_bytes()), identity)
                .is_some()
            {
                return Err(format!(
                    "entry {n} ('{id}'): its token is also another entry's token"
                ));
            }
        }
        Ok(Self { by_digest })
    }

    /// The identity a token stands for, if it is valid.
    pub fn verify(&self, token: &str) -> Option<Arc<Identity>> {
        let d = digest(token.as_bytes());
        let (stored, identity) = self.by_digest.get_key_value(&d)?;
        bool::from(stored.ct_eq(&d)).then(|| identity.clone())
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Routes that may be reached without a token when tokens are configured
/// (`GET /health` always may).
pub const PUBLIC_ROUTE_CHOICES: [&str; 3] = ["/metrics", "/services", "/services/*"];

/// Checks `--public-routes`.
pub fn parse_public_routes(list: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for r in list.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        if r == "/health" {
            continue;
        }
        if !PUBLIC_ROUTE_CHOICES.contains(&r) {
            return Err(format!(
                "--public-routes: '{r}' cannot be public; choose from {} (/health is always public)",
                PUBLIC_ROUTE_CHOICES.join(", ")
            ));
        }
        out.push(r.to_string());
    }
    Ok(out)
}

/// The node's token configuration: the tokens (reloadable) and the
/// public routes. Without `--tokens`, everything is open as before.
pub struct Auth {
    path: Option<PathBuf>,
    tokens: RwLock<Option<Arc<Tokens>>>,
    public: Vec<String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("path", &self.path)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// No tokens: the API is open.
    pub fn open() -> Self {
        Self {
            path: None,
            tokens: RwLock::new(None),
            public: Vec::new(),
        }
    }

    /// Loads `--tokens` (if given) and checks `--public-routes`.
    pub fn load(path: Option<&Path>, public: &[String]) -> Result<Self, String> {
        let public = parse_public_routes(public)?;
        let tokens = match path {
            Some(p) => Some(Arc::new(Tokens::load(p).map_err(|e| e.to_string())?)),
            None => None,
        };
        Ok(Self {
            path: path.map(Path::to_path_buf),
            tokens: RwLock::new(tokens),
            public,
        })
    }

    /// The current tokens; `None` when the API is open.
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    /// Reads the token file again and returns how many tokens it holds;
    /// `None` without `--tokens`. On an error the old tokens stay.
    pub fn reload(&self) -> Result<Option<usize>, String> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let fresh = Tokens::load(path).map_err(|e| e.to_string())?;
        let n = fresh.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fresh));
        Ok(Some(n))
    }

    /// May `path` be reached without a token?
    pub fn is_public(&self, path: &str) -> bool {
        path == "/health"
            || self.public.iter().any(|r| match r.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix) && path.len() > prefix.len(),
                None => r == path,
            })
    }
}

/// Compares a given secret (the cluster secret) with the expected one in
/// time that does not depend on where they differ (`subtle`); a length
/// mismatch answers at once.
pub fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

/// The old registry's clients send their token in this header.
pub const REGISTRY_TOKEN_HEADER: &str = "x-registry-token";

/// A request's API token: `Authorization: Bearer <token>`, or else
/// `X-Registry-Token: <token>` (the old clients' header). Both count alike
/// everywhere: checks, audit, rate limits.
pub fn request_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    bearer(headers.get(axum::http::header::AUTHORIZATION)).or_else(|| {
        headers
            .get(REGISTRY_TOKEN_HEADER)?
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
    })
}

/// The token in an `Authorization: Bearer <token>` header value.
pub fn bearer(value: Option<&axum::http::HeaderValue>) -> Option<&str> {
    let v = value?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Who sent a request, as the HTTP layer saw it; handlers get it as a
/// request extension.
#[derive(Clone, Default)]
pub struct Caller {
    /// `ip:port` of the connection (or, on a request another node passed
    /// on, the original caller's).
    pub addr: Option<String>,
    /// The token's owner, when a valid token came with the request.
    pub identity: Option<Arc<Identity>>,
    /// The token itself, to pass on to the leader with a forwarded write.
    pub token: Option<Secret>,
    /// The node that passed the request on, if any.
    pub via: Option<NodeId>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("addr", &self.addr)
            .field("identity", &self.identity)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("via", &self.via)
            .finish()
    }
}

impl Caller {
    pub fn token_id(&self) -> Option<&str> {
        self.identity.as_deref().map(|i| i.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"tokens":[
        {"id":"deployer","token":"deployer-token-0123456789","role":"write","services":["payments","osint_"]},
        {"id":"reader","token":"reader-token-0123456789","role":"read"},
        {"id":"ops","token":"ops-token-0123456789abc","role":"admin"}
    ]}"#;

    #[test]
    fn a_good_file_loads_and_verifies() {
        let t = Tokens::parse(GOOD).unwrap();
        assert_eq!(t.len(), 3);
        let d = t.verify("deployer-token-0123456789").unwrap();
        assert_eq!(d.id, "deployer");
        assert_eq!(d.role, Role::Write);
        assert!(d.may_write("payments").is_ok());
        assert!(d.may_write("payments-eu").is_ok());
        assert!(d.may_write("osint_service").is_ok());
        assert_eq!(
            d.may_write("orders"),
            Err(Refusal::Service {
                service: "orders".into()
            })
        );
        assert!(t.verify("deployer-token-012345678").is_none());
        assert!(t.verify("").is_none());
        let r = t.verify("reader-token-0123456789").unwrap();
        assert!(r.require(Role::Read).is_ok());
        assert_eq!(
            r.may_write("payments"),
            Err(Refusal::Role {
                needed: Role::Write
            })
        );
        let a = t.verify("ops-token-0123456789abc").unwrap();
        assert!(a.require(Role::Admin).is_ok());
        assert!(a.may_write("anything").is_ok());
        // Nothing prints a token.
        let dbg = format!("{t:?} {d:?}");
        assert!(!dbg.contains("token-0123"), "{dbg}");
    }

    fn refused(text: &str, needle: &str) {
        match Tokens::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => {
                assert!(e.contains(needle), "'{e}' lacks '{needle}'");
                assert!(
                    !e.contains("0123456789abcdef"),
                    "the message shows a token: {e}"
                );
            }
        }
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_message() {
        refused("not json", "not a valid token file");
        refused(r#"{"tokens":[]}"#, "no tokens");
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"root"}]}"#,
            "unknown variant `root`",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"","role":"read"}]}"#,
            "the token is empty",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"short","role":"read"}]}"#,
            "shorter than 16",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"read"},{"id":"a","token":"0123456789abcdefX","role":"read"}]}"#,
            "'a' appears twice",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"read"},{"id":"b","token":"0123456789abcdef","role":"write"}]}"#,
            "also another entry's token",
        );
        refused(
            r#"{"tokens":[{"id":"","token":"0123456789abcdef","role":"read"}]}"#,
            "the id must be",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"read","services":["x"]}]}"#,
            "write tokens only",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"write","services":[]}]}"#,
            "'services' is empty",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"write","services":["a b"]}]}"#,
            "service prefix",
        );
        refused(
            r#"{"tokens":[{"id":"a","token":"0123456789abcdef ","role":"read"}]}"#,
            "visible ASCII",
        );
        refused(
            r#"{"tokens":[{"id":"a","tokn":"0123456789abcdef","role":"read"}]}"#,
            "unknown field",
        );
        let missing = Tokens::load(Path::new("/nonexistent/tokens.json")).unwrap_err();
        assert!(missing.to_string().contains("cannot read it"), "{missing}");
    }

    #[test]
    fn reload_swaps_tokens_and_keeps_them_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, GOOD).unwrap();
        let auth = Auth::load(Some(&path), &[]).unwrap();
        assert!(auth.enabled());
        assert!(auth
            .tokens()
            .unwrap()
            .verify("reader-token-0123456789")
            .is_some());
        std::fs::write(
            &path,
            r#"{"tokens":[{"id":"new","token":"new-token-0123456789","role":"read"}]}"#,
        )
        .unwrap();
        assert_eq!(auth.reload(), Ok(Some(1)));
        let t = auth.tokens().unwrap();
        assert!(t.verify("reader-token-0123456789").is_none());
        assert_eq!(t.verify("new-token-0123456789").unwrap().id, "new");
        std::fs::write(&path, "broken").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth
            .tokens()
            .unwrap()
            .verify("new-token-0123456789")
            .is_some());
        assert_eq!(Auth::open().reload(), Ok(None));
        assert!(Auth::open().tokens().is_none());
    }

    #[test]
    fn secrets_and_the_old_clients_token_header() {
        assert!(secret_matches(b"s3cret", b"s3cret"));
        assert!(!secret_matches(b"s3cres", b"s3cret"));
        assert!(!secret_matches(b"s3cre", b"s3cret"));
        assert!(!secret_matches(b"", b"s3cret"));
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(request_token(&h), None);
        h.insert(REGISTRY_TOKEN_HEADER, " old ".parse().unwrap());
        assert_eq!(request_token(&h), Some("old"));
        // Authorization wins when both come.
        h.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer new".parse().unwrap(),
        );
        assert_eq!(request_token(&h), Some("new"));
    }

    #[test]
    fn public_routes_and_bearer() {
        assert!(parse_public_routes(&["/register".into()]).is_err());
        let auth = Auth {
            path: None,
            tokens: RwLock::new(None),
            public: parse_public_routes(&["/metrics".into(), "/services/*".into()]).unwrap(),
        };
        assert!(auth.is_public("/health"));
        assert!(auth.is_public("/metrics"));
        assert!(auth.is_public("/services/x"));
        assert!(!auth.is_public("/services"));
        assert!(!auth.is_public("/register"));
        let h = |s: &str| axum::http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(Some(&h("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("bearer  abc "))), Some("abc"));
        assert_eq!(bearer(Some(&h("Basic abc"))), None);
        assert_eq!(bearer(Some(&h("Bearer "))), None);
        assert_eq!(bearer(None), None);
        assert_eq!(format!("{:?}", Secret::from("hunter2")), "\"<redacted>\"");
    }
}
