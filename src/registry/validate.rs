//! Validation of client input. Each rule names the field it checks, so a
//! client learns exactly what to fix; nothing here touches state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A rejected field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn err<T>(field: &'static str, message: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field,
        message: message.into(),
    })
}

pub const MAX_NAME: usize = 128;
pub const MAX_HOST: usize = 253;
pub const MAX_INSTANCE_ID: usize = 256;
pub const MAX_HEALTH_ENDPOINT: usize = 512;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY: usize = 128;
pub const MAX_METADATA_VALUE: usize = 1024;
/// Keys and values of all metadata entries together, in bytes.
pub const MAX_METADATA_TOTAL: usize = 8 * 1024;
pub const MIN_TTL: u64 = 5;
pub const MAX_TTL: u64 = 86_400;
pub const DEFAULT_TTL: u32 = 60;

/// A validated `POST /register` body. `host` is `None` when the client left
/// it out: the receiving node fills in the caller's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub service_name: String,
    pub port: u16,
    pub host: Option<String>,
    pub health_endpoint: String,
    pub metadata: BTreeMap<String, String>,
    pub instance_id: Option<String>,
    pub ttl_seconds: u32,
    /// The `endpoint` given was `https://`.
    #[serde(default)]
    pub https: bool,
    /// The caller's IP address, filled in by the receiving node (never
    /// from the body); forwarded to the leader with the request.
    #[serde(default)]
    pub origin: Option<String>,
}

/// A validated `POST /heartbeat` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub service_name: String,
    pub instance_id: Option<String>,
    /// The caller's IP address, filled in by the receiving node.
    #[serde(default)]
    pub origin: Option<String>,
}

fn object(body: &Value) -> Result<&Map<String, Value>, FieldError> {
    body.as_object()
        .map_or_else(|| err("body", "the body must be a JSON object"), Ok)
}

/// A field that is absent or JSON `null` counts as not given.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn string<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => err(name, format!("{name} must be a string")),
    }
}

/// Checks a service name: 1-128 characters of `[A-Za-z0-9_.-]`.
pub fn service_name(name: &str, field: &'static str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return err(
            field,
            format!("{field} must be 1-{MAX_NAME} characters long"),
        );
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return err(
            field,
            format!("{field} may contain only A-Z, a-z, 0-9, '_', '.' and '-'"),
        );
    }
    // Path segments every URL parser resolves: never a usable name.
    if name == "." || name == ".." {
        return err(field, format!("{field} must not be '.' or '..'"));
    }
    Ok(())
}

/// Whether `c` may not appear in free text: control characters, and the
/// invisible ones that make text read differently from what it is: bidi
/// controls (U+202A-U+202E, U+2066-U+2069, U+200E/F, U+061C), zero-width
/// characters and joiners (U+200B-U+200D, U+2060-U+2064, U+FEFF), the rest
/// of Unicode's "format" category (soft hyphen, tags, ...), and the line and
/// paragraph separators U+2028/U+2029.
pub fn is_hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

/// Refuses a JSON text in which some object has the same key twice
/// (`serde_json` would silently keep the last one).
pub fn no_duplicate_keys(json: &[u8]) -> Result<(), FieldError> {
    use serde::de::{self, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;
    use std::collections::HashSet;

    struct Check;
    impl<'de> Deserialize<'de> for Check {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(Check)
        }
    }
    impl<'de> Visitor<'de> for Check {
        type Value = Check;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_str<E>(self, _: &str) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_unit<E>(self) -> Result<Check, E> {
            Ok(Check)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Check, A::Error> {
            while seq.next_element::<Check>()?.is_some() {}
            Ok(Check)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Check, A::Error> {
            let mut seen = HashSet::new();
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if !seen.insert(key.clone()) {
                    return Err(de::Error::custom(format!("duplicate key '{key}'")));
                }
                map.next_value::<Check>()?;
            }
            Ok(Check)
        }
    }

    let mut de = serde_json::Deserializer::from_slice(json);
    match Check::deserialize(&mut de).and_then(|_| de.end()) {
        Ok(()) => Ok(()),
        Err(e) => err("body", format!("malformed JSON body: {e}")),
    }
}

/// Checks an instance id: 1-256 printable ASCII characters, no spaces, no '/'.
pub fn instance_id(id: &str) -> Result<(), FieldError> {
    if id.is_empty() || id.len() > MAX_INSTANCE_ID {
        return err(
            "instance_id",
            format!("instance_id must be 1-{MAX_INSTANCE_ID} characters long"),
        );
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return err(
            "instance_id",
            "instance_id may contain only printable ASCII without spaces or '/'",
        );
    }
    Ok(())
}

fn host(h: &str) -> Result<(), FieldError> {
    host_in(h, "host")
}

fn host_in(h: &str, field: &'static str) -> Result<(), FieldError> {
    if h.is_empty() || h.len() > MAX_HOST {
        return err(
            field,
            format!("{field}: the host must be 1-{MAX_HOST} characters long"),
        );
    }
    if !h.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']' | b'%')
    }) {
        return err(
            field,
            format!("{field}: the host must be an ASCII hostname or an IP address"),
        );
    }
    Ok(())
}

/// An `endpoint` as the old clients send it: `http(s)://host:port`, with
/// nothing else (no user info, no path beyond `/`, no query, no fragment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// The host, IPv6 literals without their brackets.
    pub host: String,
    pub port: u16,
}

/// Parses an `endpoint` field.
pub fn endpoint(e: &str) -> Result<Endpoint, FieldError> {
    const WANT: &str = "endpoint must look like http://host:port or https://host:port";
    let lower = e.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    let (https, rest) = if lower.starts_with("http://") {
        (false, &e[7..])
    } else if lower.starts_with("https://") {
        (true, &e[8..])
    } else {
        return err(
            "endpoint",
            format!("{WANT} (the scheme is missing or not http/https)"),
        );
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return err("endpoint", format!("{WANT}: no path, query or fragment"));
    }
    if authority.contains('@') {
        return err("endpoint", format!("{WANT}: no user name or password"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once("]:") {
            Some((h, p)) if !h.is_empty() && h.parse::<std::net::Ipv6Addr>().is_ok() => (h, p),
            _ => {
                return err(
                    "endpoint",
                    format!("{WANT}: an IPv6 host goes in brackets, [::1]:8080"),
                )
            }
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return err(
                    "endpoint",
                    format!("{WANT}: an IPv6 host goes in brackets, [::1]:8080"),
                )
            }
            Some((h, p)) => (h, p),
            None => return err("endpoint", format!("{WANT}: the port is missing")),
        }
    };
    if host.is_empty() {
        return err("endpoint", format!("{WANT}: the host is missing"));
    }
    host_in(host, "endpoint")?;
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 && !port.starts_with('+') => p,
        _ => {
            return err(
                "endpoint",
                format!("{WANT}: the port must be a number from 1 to 65535"),
            )
        }
    };
    Ok(Endpoint {
        https,
        host: host.to_owned(),
        port,
    })
}

fn health_endpoint(p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') || p.len() > MAX_HEALTH_ENDPOINT {
        return err(
            "health_endpoint",
            format!("health_endpoint must be a path starting with '/', at most {MAX_HEALTH_ENDPOINT} characters"),
        );
    }
    if !p.bytes().all(|b| b.is_ascii_graphic()) {
        return err(
            "health_endpoint",
            "health_endpoint may contain only printable ASCII without spaces",
        );
    }
    Ok(())
}

fn metadata(v: Option<&Value>) -> Result<BTreeMap<String, String>, FieldError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let Value::Object(m) = v else {
        return err("metadata", "metadata must be an object of string values");
    };
    if m.len() > MAX_METADATA_ENTRIES {
        return err(
            "metadata",
            format!("metadata may have at most {MAX_METADATA_ENTRIES} entries"),
        );
    }
    let mut out = BTreeMap::new();
    let mut total = 0;
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return err(
                "metadata",
                format!(
                    "metadata keys must be 1-{MAX_METADATA_KEY} printable ASCII characters without spaces"
                ),
            );
        }
        let Value::String(s) = v else {
            return err(
                "metadata",
                format!("metadata value of '{k}' must be a string"),
            );
        };
        if s.len() > MAX_METADATA_VALUE {
            return err(
                "metadata",
                format!("metadata value of '{k}' must be at most {MAX_METADATA_VALUE} bytes"),
            );
        }
        if s.chars().any(is_hidden_char) {
            return err(
                "metadata",
                format!("metadata value of '{k}' must not contain control, bidi or zero-width characters"),
            );
        }
        total += k.len() + s.len();
        if total > MAX_METADATA_TOTAL {
            return err(
                "metadata",
                format!("metadata keys and values may total at most {MAX_METADATA_TOTAL} bytes"),
            );
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

fn integer(
    obj: &Map<String, Value>,
    name: &'static str,
    lo: u64,
    hi: u64,
) -> Result<Option<u64>, FieldError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => err(name, format!("{name} must be an integer from {lo} to {hi}")),
        },
    }
}

/// Validates a `POST /register` body; a body without `ttl_seconds` gets
/// [`DEFAULT_TTL`].
pub fn parse_register(body: &Value) -> Result<RegisterRequest, FieldError> {
    parse_register_with(body, DEFAULT_TTL)
}

/// [`parse_register`] with the node's default TTL (`--default-ttl-secs`).
pub fn parse_register_with(body: &Value, default_ttl: u32) -> Result<RegisterRequest, FieldError> {
    let obj = object(body)?;
    let Some(name) = string(obj, "service_name")? else {
        return err("service_name", "service_name is required");
    };
    service_name(name, "service_name")?;
    let endpoint = string(obj, "endpoint")?.map(endpoint).transpose()?;
    let port = integer(obj, "port", 1, 65_535)?;
    let host_v = string(obj, "host")?;
    if let Some(h) = host_v {
        host(h)?;
    }
    // `endpoint` (the old clients' form) stands for host and port; given
    // with either, they must agree.
    let (port, host_v) = match (&endpoint, port) {
        (None, None) => {
            return err(
                "port",
                "port is required (or an endpoint, http://host:port)",
            )
        }
        (None, Some(p)) => (p as u16, host_v.map(str::to_owned)),
        (Some(e), p) => {
            if p.is_some_and(|p| p != u64::from(e.port)) {
                return err(
                    "port",
                    format!(
                        "port {} disagrees with the endpoint's port {}",
                        p.unwrap_or(0),
                        e.port
                    ),
                );
            }
            if let Some(h) = host_v {
                let bare = h.trim_start_matches('[').trim_end_matches(']');
                if !bare.eq_ignore_ascii_case(&e.host) {
                    return err(
                        "host",
                        format!("host '{h}' disagrees with the endpoint's host '{}'", e.host),
                    );
                }
            }
            (e.port, Some(e.host.clone()))
        }
    };
    let health = string(obj, "health_endpoint")?.unwrap_or("/health");
    health_endpoint(health)?;
    let id = string(obj, "instance_id")?;
    if let Some(id) = id {
        instance_id(id)?;
    }
    let ttl = integer(obj, "ttl_seconds", MIN_TTL, MAX_TTL)?.map_or(default_ttl, |t| t as u32);
    Ok(RegisterRequest {
        service_name: name.to_owned(),
        port,
        host: host_v,
        health_endpoint: health.to_owned(),
        metadata: metadata(field(obj, "metadata"))?,
        instance_id: id.map(str::to_owned),
        ttl_seconds: ttl,
        https: endpoint.is_some_and(|e| e.https),
        origin: None,
    })
}

/// Validates a `POST /heartbeat` body.
pub fn parse_heartbeat(body: &Value) -> Result<HeartbeatRequest, FieldError> {
    let obj = object(body)?;
    let Some(name) = string(obj, "service_name")? else {
        return err("service_name", "service_name is required");
    };
    service_name(name, "service_name")?;
    let id = string(obj, "instance_id")?;
    if let Some(id) = id {
        instance_id(id)?;
    }
    Ok(HeartbeatRequest {
        service_name: name.to_owned(),
        instance_id: id.map(str::to_owned),
        origin: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(v: Value) -> &'static str {
        parse_register(&v).unwrap_err().field
    }

    #[test]
    fn defaults_are_filled_in() {
        let r = parse_register(&json!({"service_name": "osint_service", "port": 8049})).unwrap();
        assert_eq!(r.health_endpoint, "/health");
        assert_eq!(r.ttl_seconds, 60);
        assert_eq!(r.host, None);
        assert!(r.metadata.is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(json!([1])), "body");
        assert_eq!(field_of(json!({"port": 1})), "service_name");
        assert_eq!(
            field_of(json!({"service_name": "a b", "port": 1})),
            "service_name"
        );
        assert_eq!(
            field_of(json!({"service_name": "x".repeat(129), "port": 1})),
            "service_name"
        );
        assert_eq!(
            field_of(json!({"service_name": 5, "port": 1})),
            "service_name"
        );
        assert_eq!(field_of(json!({"service_name": "a"})), "port");
        assert_eq!(field_of(json!({"service_name": "a", "port": 0})), "port");
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 70000})),
            "port"
        );
        assert_eq!(field_of(json!({"service_name": "a", "port": "80"})), "port");
        assert_eq!(field_of(json!({"service_name": "a", "port": 1.5})), "port");
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "host": "a b"})),
            "host"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "health_endpoint": "health"})),
            "health_endpoint"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "metadata": {"k": 1}})),
            "metadata"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "metadata": "x"})),
            "metadata"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "ttl_seconds": 4})),
            "ttl_seconds"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "ttl_seconds": 86401})),
            "ttl_seconds"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "port": 1, "instance_id": "a/b"})),
            "instance_id"
        );
    }

    #[test]
    fn the_old_clients_endpoint_stands_for_host_and_port() {
        let r = parse_register(&json!({
            "service_name": "osint_service",
            "endpoint": "http://osint-service:8049",
            "health_endpoint": "/health",
            "metadata": {"version": "1"}
        }))
        .unwrap();
        assert_eq!(
            (r.host.as_deref(), r.port, r.https),
            (Some("osint-service"), 8049, false)
        );
        let r = parse_register(&json!({"service_name": "a", "endpoint": "HTTPS://[::1]:443/"}))
            .unwrap();
        assert_eq!(
            (r.host.as_deref(), r.port, r.https),
            (Some("::1"), 443, true)
        );
        // Both forms, agreeing.
        let r = parse_register(
            &json!({"service_name": "a", "endpoint": "http://h:1", "host": "H", "port": 1}),
        );
        assert!(r.is_ok());
        assert_eq!(
            field_of(json!({"service_name": "a", "endpoint": "http://h:1", "port": 2})),
            "port"
        );
        assert_eq!(
            field_of(json!({"service_name": "a", "endpoint": "http://h:1", "host": "g"})),
            "host"
        );
        for bad in [
            "h:80",
            "ftp://h:80",
            "http://h",
            "http://h:",
            "http://:80",
            "http://h:80/api",
            "http://h:80?x=1",
            "http://h:80#f",
            "http://u:p@h:80",
            "http://h:0",
            "http://h:65536",
            "http://h:+80",
            "http://bücher.de:80",
            "http://::1:80",
            "http://[zz]:80",
            "http://h h:80",
            "",
        ] {
            assert_eq!(
                field_of(json!({"service_name": "a", "endpoint": bad})),
                "endpoint",
                "{bad}"
            );
        }
        assert_eq!(
            field_of(json!({"service_name": "a", "endpoint": 5})),
            "endpoint"
        );
    }

    #[test]
    fn heartbeat_needs_a_valid_name() {
        assert!(parse_heartbeat(&json!({"service_name": "a"})).is_ok());
        assert_eq!(
            parse_heartbeat(&json!({})).unwrap_err().field,
            "service_name"
        );
        assert_eq!(
            parse_heartbeat(&json!({"service_name": "a", "instance_id": 3}))
                .unwrap_err()
                .field,
            "instance_id"
        );
    }
}
