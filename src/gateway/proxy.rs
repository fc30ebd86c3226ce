//! Forwarding one request: parse `/v2/{service}/{path}`, pick an instance
//! (round robin over closed breakers), stream the body both ways, and map
//! upstream failures to 502/504. Owns header hygiene (hop-by-hop headers,
//! `X-Forwarded-*`); does not own the route cache (`routes.rs`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::metrics::status_class;
use super::routes::{Instance, Route, Source};
use super::{error_response, Shared};
use crate::http::error_chain;
use crate::registry::validate;

/// Headers that describe one connection, not the message (RFC 9110 7.6.1),
/// plus the legacy `Proxy-Connection` and `Expect` (the gateway's own server
/// already answered `100-continue`; the client towards the upstream does not
/// wait for one).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "proxy-connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Splits `/v2/{service}/{rest}` into the service and the upstream path
/// (`/` + rest, exactly as received: no decoding, no normalizing).
///
/// Refused, because an upstream (or the URL parser on the way to it) could
/// read the path as something other than what the gateway checked:
/// - a `..` segment, also percent-encoded (once or more) or next to a
///   backslash;
/// - a backslash, raw or encoded (Windows servers treat it as a separator);
/// - an encoded `/` (`%2F`, also double-encoded): upstreams that decode it
///   see different segments;
/// - encoded control characters (`%00`-`%1F`, `%7F`: NUL, CR, LF, ...);
/// - a path that looks like a URL (`//host/...` or `scheme://...`), which
///   naive upstreams take for an absolute or protocol-relative URL.
pub fn split_path(raw: &str) -> Result<(&str, String), String> {
    let after = raw
        .strip_prefix("/v2/")
        .ok_or_else(|| "the path must start with /v2/{service}".to_string())?;
    let (service, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    validate::service_name(service, "service").map_err(|e| e.message)?;
    check_upstream_path(rest)?;
    let path = if rest.is_empty() {
        "/".to_string()
    } else {
        rest.to_string()
    };
    Ok((service, path))
}

/// Percent-decodes once; a `%` not followed by two hex digits stays as is.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn check_upstream_path(rest: &str) -> Result<(), String> {
    let separators = |v: &[u8]| v.iter().filter(|b| matches!(b, b'/' | b'\\')).count();
    // Decode until nothing changes (bounded: each round shortens the text).
    let mut view = rest.as_bytes().to_vec();
    let raw_separators = separators(&view);
    for _ in 0..4 {
        let next = percent_decode(&view);
        if next == view {
            break;
        }
        view = next;
    }
    if view.contains(&b'\\') {
        return Err("backslashes are not allowed in the path".into());
    }
    if separators(&view) != raw_separators {
        return Err("percent-encoded '/' or '\\' is not allowed in the path".into());
    }
    if view.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err("control characters are not allowed in the path".into());
    }
    if view.split(|b| *b == b'/').any(|seg| seg == b"..") {
        return Err("'..' path segments are not allowed".into());
    }
    if view.starts_with(b"//") || view.windows(3).any(|w| w == b"://") {
        return Err("the path must not look like a URL ('//host' or 'scheme://')".into());
    }
    Ok(())
}

/// Names listed in a `Connection` header: hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Copies end-to-end headers, dropping hop-by-hop ones (and `Host` when
/// asked: the client sets the upstream's).
pub(super) fn end_to_end(headers: &HeaderMap, drop_host: bool) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || listed.iter().any(|l| l == n)
            || (drop_host && name == header::HOST)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// `X-Forwarded-For`: the client's list, if any, and then `peer`.
pub(super) fn forwarded_for(headers: &HeaderMap, peer: IpAddr) -> String {
    let peer_ip = peer.to_canonical().to_string();
    match headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        v if v.is_empty() => peer_ip,
        v => format!("{}, {peer_ip}", v.join(", ")),
    }
}

/// Whether a request carries no body, so it can be sent again.
fn has_no_body(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_LENGTH) {
        Some(v) => v.as_bytes() == b"0",
        None => !headers.contains_key(header::TRANSFER_ENCODING),
    }
}

/// Round robin over instances whose breaker lets a request through,
/// skipping those already tried. If every breaker is open, the instance
/// whose cooldown ends first gets the request as its trial: failing without
/// trying helps nobody, and a recovered instance is found sooner.
fn pick(route: &Route, tried: &[Arc<Instance>]) -> Option<Arc<Instance>> {
    let candidates: Vec<&Arc<Instance>> = route
        .instances
        .iter()
        .filter(|i| !tried.iter().any(|t| Arc::ptr_eq(t, i)))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let now = Instant::now();
    let start = route.rr.fetch_add(1, Ordering::Relaxed);
    for k in 0..candidates.len() {
        let inst = candidates[(start + k) % candidates.len()];
        if inst.breaker.lock().unwrap().try_acquire(now) {
            return Some(inst.clone());
        }
    }
    let inst = candidates
        .iter()
        .min_by_key(|i| i.breaker.lock().unwrap().available_at(now))?;
    inst.breaker.lock().unwrap().force(now);
    Some((*inst).clone())
}

enum Outcome {
    Ok,
    Failed,
}

impl Shared {
    fn record(&self, service: &str, inst: &Instance, outcome: Outcome) {
        let mut b = inst.breaker.lock().unwrap();
        match outcome {
            Outcome::Ok => b.on_success(),
            Outcome::Failed => {
                if b.on_failure(Instant::now()) {
                    tracing::warn!(service, instance = %inst.url, "circuit breaker opened");
                    self.routes.breaker_opened(service);
                }
            }
        }
    }
}

pub async fn proxy(
    State(gw): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (service, path) = match split_path(req.uri().path()) {
        Ok((s, p)) => (s.to_string(), p),
        Err(msg) => {
            gw.metrics
                .requests
                .with_label_values(&["_invalid", "4xx"])
                .inc();
            return error_response(StatusCode::BAD_REQUEST, "bad_request", &msg);
        }
    };
    let resp = forward(&gw, peer, &service, path, req).await;
    let label = if resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && !resp.headers().contains_key("x-gateway-instance")
    {
        "_unresolved"
    } else {
        service.as_str()
    };
    gw.metrics
        .requests
        .with_label_values(&[label, status_class(resp.status().as_u16())])
        .inc();
    resp
}

async fn forward(
    gw: &Shared,
    peer: SocketAddr,
    service: &str,
    path: String,
    req: Request,
) -> Response {
    let Some(route) = gw.routes.resolve(service).await else {
        let mut resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            &format!(
                "no instance of service '{service}' is known to the registry or the environment"
            ),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return resp;
    };
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let mut headers = end_to_end(&parts.headers, true);
    let xff = forwarded_for(&parts.headers, peer.ip());
    headers.remove("x-forwarded-for");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(host) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    let replayable = has_no_body(&parts.headers);
    let mut body = Some(body);
    let mut tried: Vec<Arc<Instance>> = Vec::new();
    loop {
        let Some(inst) = pick(&route, &tried) else {
            // Only reached after a failed first try with nobody else to ask.
            return error_response(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                &format!("no instance of service '{service}' could be reached"),
            );
        };
        tried.push(inst.clone());
        let url = format!("{}{path}{query}", inst.url);
        let mut rb = gw
            .client
            .request(parts.method.clone(), &url)
            .headers(headers.clone());
        if !replayable {
            if let Some(b) = body.take() {
                rb = rb.body(reqwest::Body::wrap_stream(b.into_data_stream()));
            }
        }
        let started = Instant::now();
        let sent = tokio::time::timeout(gw.cfg.timeout, rb.send()).await;
        gw.metrics
            .upstream_latency
            .with_label_values(&[service])
            .observe(started.elapsed().as_secs_f64());
        let resp = match sent {
            Err(_) => {
                gw.record(service, &inst, Outcome::Failed);
                return timeout_response(service, gw.cfg.timeout.as_millis());
            }
            Ok(Err(e)) => {
                gw.record(service, &inst, Outcome::Failed);
                if e.is_timeout() {
                    return timeout_response(service, gw.cfg.timeout.as_millis());
                }
                let others = route.instances.len() > tried.len();
                if e.is_connect() && replayable && tried.len() == 1 && others {
                    tracing::debug!(service, instance = %inst.url, "connect failed; trying another instance");
                    continue;
                }
                tracing::warn!(service, instance = %inst.url, error = %error_chain(&e), "upstream request failed");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    "bad_gateway",
                    &format!(
                        "instance {} of service '{service}' failed: {}",
                        inst.url,
                        error_chain(&e)
                    ),
                );
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        let failed = matches!(status.as_u16(), 502..=504);
        gw.record(
            service,
            &inst,
            if failed { Outcome::Failed } else { Outcome::Ok },
        );
        return upstream_response(resp, &route, &inst);
    }
}

fn timeout_response(service: &str, ms: u128) -> Response {
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "gateway_timeout",
        &format!("service '{service}' did not answer within {ms} ms"),
    )
}

/// The upstream's answer, streamed, without hop-by-hop headers, plus the
/// route's age and the instance that answered.
fn upstream_response(resp: reqwest::Response, route: &Route, inst: &Instance) -> Response {
    let status = resp.status();
    let mut headers = end_to_end(resp.headers(), false);
    if route.source == Source::Registry {
        headers.insert(
            HeaderName::from_static("x-gateway-route-age"),
            HeaderValue::from(route.age().as_secs()),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&inst.url) {
        headers.insert(HeaderName::from_static("x-gateway-instance"), v);
    }
    let mut out = Body::from_stream(resp.bytes_stream()).into_response();
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_and_dot_dot_is_refused() {
        assert_eq!(split_path("/v2/svc").unwrap(), ("svc", "/".to_string()));
        assert_eq!(split_path("/v2/svc/").unwrap(), ("svc", "/".to_string()));
        assert_eq!(
            split_path("/v2/a.b-c/x/%20y/..z").unwrap(),
            ("a.b-c", "/x/%20y/..z".to_string())
        );
        for bad in [
            "/v2/svc/../x",
            "/v2/svc/a/..",
            "/v2/svc/%2e%2E/x",
            "/v2/svc/.%2e",
            "/v2/svc/x\\..\\y",
            "/v2/svc/a/..%5c..",
            "/v2/svc/a/..%2Fb",
            "/v2/svc/%252e%252e/x",
            "/v2/svc/a%2fb",
            "/v2/svc/a%252Fb",
            "/v2/svc/a\\b",
            "/v2/svc/a%5cb",
            "/v2/svc/a%0d%0aSet-Cookie:x",
            "/v2/svc/a%00",
            "/v2/svc/http://evil/",
            "/v2/svc//evil.example/x",
            "/v2/../x",
            "/v2/./x",
            "/v2/bad name/x",
            "/v2//x",
            "/v2/",
        ] {
            assert!(split_path(bad).is_err(), "{bad}");
        }
        let long = format!("/v2/{}/x", "a".repeat(129));
        assert!(split_path(&long).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("host", HeaderValue::from_static("gw"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let out = end_to_end(&h, true);
        assert_eq!(out.len(), 1);
        assert!(out.contains_key("x-kept"));
        assert!(end_to_end(&h, false).contains_key("host"));
    }

    #[test]
    fn bodiless_requests() {
        let mut h = HeaderMap::new();
        assert!(has_no_body(&h));
        h.insert("content-length", HeaderValue::from_static("0"));
        assert!(has_no_body(&h));
        h.insert("content-length", HeaderValue::from_static("3"));
        assert!(!has_no_body(&h));
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(!has_no_body(&h));
    }
}
