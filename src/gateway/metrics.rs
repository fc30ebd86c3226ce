//! The gateway's Prometheus metrics, in a registry of their own (the node's
//! metrics live in `crate::metrics`).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct GatewayMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub upstream_latency: HistogramVec,
    pub breaker_opens: IntCounterVec,
    pub registry_lookups: IntCounterVec,
    pub registry_failures: IntCounter,
    pub cache_size: IntGauge,
    pub rate_limited: IntCounter,
    pub connections_refused: IntCounterVec,
    pub registry_proxy_requests: IntCounterVec,
    pub registry_proxy_failovers: IntCounterVec,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "Proxied requests by service and status class",
            ),
            &["service", "status"],
        )
        .expect("valid metric");
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "gateway_upstream_duration_seconds",
                "Time until an upstream's response headers, by service",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["service"],
        )
        .expect("valid metric");
        let breaker_opens = IntCounterVec::new(
            Opts::new(
                "gateway_breaker_opens_total",
                "Times an instance's circuit breaker opened, by service",
            ),
            &["service"],
        )
        .expect("valid metric");
        let registry_lookups = IntCounterVec::new(
            Opts::new(
                "gateway_registry_lookups_total",
                "Registry lookups by result (found, not_found, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let registry_failures = IntCounter::new(
            "gateway_registry_failures_total",
            "Failed requests to a registry node",
        )
        .expect("valid metric");
        let cache_size = IntGauge::new("gateway_route_cache_size", "Services in the route cache")
            .expect("valid metric");
        let rate_limited = IntCounter::new(
            "gateway_rate_limited_total",
            "Requests refused with 429 by --rate-limit-per-ip",
        )
        .expect("valid metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "gateway_connections_refused_total",
                "Connections closed before a request: plain_http (on an HTTPS listener), tls_handshake (failed or too slow)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let registry_proxy_requests = IntCounterVec::new(
            Opts::new(
                "gateway_registry_proxy_requests_total",
                "Requests passed to the registry by --registry-listen, by status class",
            ),
            &["status"],
        )
        .expect("valid metric");
        let registry_proxy_failovers = IntCounterVec::new(
            Opts::new(
                "gateway_registry_proxy_failovers_total",
                "Requests --registry-listen sent on to the next registry node, by reason: connect (the node could not be reached), no_leader (it answered 503 without a leader), read (a read failed otherwise)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let registry = Registry::new();
        registry
            .register(Box::new(registry_proxy_requests.clone()))
            .unwrap();
        registry
            .register(Box::new(registry_proxy_failovers.clone()))
            .unwrap();
        registry
            .register(Box::new(connections_refused.clone()))
            .unwrap();
        registry.register(Box::new(requests.clone())).unwrap();
        registry
            .register(Box::new(upstream_latency.clone()))
            .unwrap();
        registry.register(Box::new(breaker_opens.clone())).unwrap();
        registry
            .register(Box::new(registry_lookups.clone()))
            .unwrap();
        registry
            .register(Box::new(registry_failures.clone()))
            .unwrap();
        registry.register(Box::new(cache_size.clone())).unwrap();
        registry.register(Box::new(rate_limited.clone())).unwrap();
        Self {
            registry,
            requests,
            upstream_latency,
            breaker_opens,
            registry_lookups,
            registry_failures,
            cache_size,
            rate_limited,
            connections_refused,
            registry_proxy_requests,
            registry_proxy_failovers,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
