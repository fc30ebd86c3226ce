//! The route cache: which instances serve a service, where that answer came
//! from (registry or environment), and how old it is. Owns the registry
//! lookups, the registry's circuit breaker and one watch task per cached
//! service. Does not proxy anything (see `proxy.rs`).
//!
//! Routes are dropped only when the registry says the service is gone (404)
//! or when nobody asked for the service for `watch_idle`; a registry that
//! cannot be reached never drops a route: the last-known instances keep
//! serving, and their age says how stale they are.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::breaker::Breaker;
use super::metrics::GatewayMetrics;
use super::GatewayConfig;

/// A watch answer faster than this with nothing new means the registry
/// ignored `index`/`wait`: wait this long before asking again.
const MIN_WATCH_PERIOD: Duration = Duration::from_secs(1);
/// Longest pause between watch attempts while the registry is unreachable.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry,
    /// The environment variable the URL came from.
    Environment(String),
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::Registry => "registry",
            Source::Environment(_) => "environment",
        }
    }
}

/// One upstream instance and its breaker. The breaker survives route
/// updates that keep the instance.
pub struct Instance {
    /// `http://host:port`, no trailing slash.
    pub url: String,
    pub breaker: Mutex<Breaker>,
}

/// An immutable answer: replaced as a whole when the registry speaks.
pub struct Route {
    pub source: Source,
    pub instances: Vec<Arc<Instance>>,
    /// When the registry (or the environment) last confirmed this answer.
    pub confirmed: Instant,
    index: Option<u64>,
    /// Round-robin position, shared across updates of the same service.
    pub rr: Arc<AtomicUsize>,
}

impl Route {
    pub fn age(&self) -> Duration {
        self.confirmed.elapsed()
    }
}

struct Entry {
    route: Arc<Route>,
    last_used: Instant,
    watcher: Option<AbortHandle>,
}

enum Lookup {
    Found {
        urls: Vec<String>,
        index: Option<u64>,
    },
    NotFound,
    Failed,
}

pub struct Routes {
    cfg: Arc<GatewayConfig>,
    http: reqwest::Client,
    // A std mutex: held only for map updates, never across an await.
    entries: Mutex<HashMap<String, Entry>>,
    registry_breaker: Mutex<Breaker>,
    next_node: AtomicUsize,
    metrics: Arc<GatewayMetrics>,
    shutdown: watch::Receiver<bool>,
}

impl Routes {
    pub fn new(
        cfg: Arc<GatewayConfig>,
        metrics: Arc<GatewayMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        // `GatewayConfig::check` has tried the TLS settings already.
        let http = cfg
            .tls
            .apply(reqwest::Client::builder())
            .unwrap_or_default()
            .connect_timeout(cfg.registry_timeout)
            .build()
            .expect("the HTTP client builds with checked settings");
        let registry_breaker = Breaker::new(
            cfg.breaker_threshold,
            cfg.breaker_cooldown,
            cfg.registry_timeout,
        );
        Self {
            cfg,
            http,
            entries: Mutex::new(HashMap::new()),
            registry_breaker: Mutex::new(registry_breaker),
            next_node: AtomicUsize::new(0),
            metrics,
            shutdown,
        }
    }

    /// Cache → registry → environment. `None`: nobody knows the service.
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Option<Arc<Route>> {
        let cached = {
            let mut entries = self.entries.lock().unwrap();
            entries.get_mut(name).map(|e| {
                e.last_used = Instant::now();
                e.route.clone()
            })
        };
        if let Some(route) = &cached {
            if route.age() < self.cfg.cache_ttl {
                return cached;
            }
        }
        let may_ask = self
            .registry_breaker
            .lock()
            .unwrap()
            .try_acquire(Instant::now());
        if may_ask {
            match self.lookup(name, None).await {
                Lookup::Found { urls, index } => {
                    self.registry_ok();
                    if urls.is_empty() {
                        self.remove(name);
                    } else {
                        return Some(self.store(name, urls, index, Source::Registry));
                    }
                }
                Lookup::NotFound => {
                    self.registry_ok();
                    self.remove(name);
                }
                Lookup::Failed => {
                    self.registry_failed();
                    if cached.is_some() {
                        return cached;
                    }
                }
            }
        } else if cached.is_some() {
            return cached;
        }
        let (var, url) = env_var_names(name)
            .into_iter()
            .find_map(|var| Some((var.clone(), env_url(&(self.cfg.env)(&var)?)?)))?;
        tracing::debug!(service = name, variable = %var, "route from the environment");
        Some(self.store(name, vec![url], None, Source::Environment(var)))
    }

    fn registry_ok(&self) {
        self.registry_breaker.lock().unwrap().on_success();
    }

    fn registry_failed(&self) {
        self.registry_breaker
            .lock()
            .unwrap()
            .on_failure(Instant::now());
    }

    fn remove(&self, name: &str) {
        let mut entries = self.entries.lock().unwrap();
        if let Some(e) = entries.remove(name) {
            if let Some(w) = e.watcher {
                w.abort();
            }
        }
        self.metrics.cache_size.set(entries.len() as i64);
    }

    /// Stores an answer, keeping the breakers of instances it keeps, and
    /// starts watching a registry-sourced service.
    fn store(
        self: &Arc<Self>,
        name: &str,
        urls: Vec<String>,
        index: Option<u64>,
        source: Source,
    ) -> Arc<Route> {
        let mut entries = self.entries.lock().unwrap();
        if !entries.contains_key(name) && entries.len() >= self.cfg.max_services {
            // Make room: forget the service asked for least recently.
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(e) = oldest.and_then(|k| entries.remove(&k)) {
                if let Some(w) = e.watcher {
                    w.abort();
                }
            }
        }
        let registry = source == Source::Registry;
        let entry = entries.entry(name.to_string()).or_insert_with(|| Entry {
            route: Arc::new(Route {
                source: source.clone(),
                instances: Vec::new(),
                confirmed: Instant::now(),
                index: None,
                rr: Arc::new(AtomicUsize::new(rand::random::<u16>() as usize)),
            }),
            last_used: Instant::now(),
            watcher: None,
        });
        let old = &entry.route;
        let instances = urls
            .into_iter()
            .map(|url| {
                old.instances
                    .iter()
                    .find(|i| i.url == url)
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Instance {
                            url,
                            breaker: Mutex::new(Breaker::new(
                                self.cfg.breaker_threshold,
                                self.cfg.breaker_cooldown,
                                self.cfg.timeout + self.cfg.breaker_cooldown,
                            )),
                        })
                    })
            })
            .collect();
        let route = Arc::new(Route {
            source,
            instances,
            confirmed: Instant::now(),
            index,
            rr: old.rr.clone(),
        });
        entry.route = route.clone();
        if registry && entry.watcher.is_none() {
            let me = self.clone();
            let service = name.to_string();
            entry.watcher = Some(tokio::spawn(me.watch(service)).abort_handle());
        } else if !registry {
            if let Some(w) = entry.watcher.take() {
                w.abort();
            }
        }
        self.metrics.cache_size.set(entries.len() as i64);
        route
    }

    /// Asks the registry nodes in turn, starting with the last one that
    /// answered. `block`: a Consul-style blocking query (index, wait).
    async fn lookup(&self, name: &str, block: Option<(u64, Duration)>) -> Lookup {
        let nodes = &self.cfg.registry;
        let start = self.next_node.load(Ordering::Relaxed);
        for k in 0..nodes.len() {
            let i = (start + k) % nodes.len();
            let base = nodes[i].trim_end_matches('/');
            let mut req = self.http.get(format!("{base}/services/{name}"));
            if let Some(t) = &self.cfg.token {
                req = req.bearer_auth(t.expose());
            }
            req = match block {
                Some((index, wait)) => req
                    .query(&[
                        ("index", index.to_string()),
                        ("wait", format!("{}s", wait.as_secs().max(1))),
                    ])
                    .timeout(wait + self.cfg.registry_timeout),
                None => req.timeout(self.cfg.registry_timeout),
            };
            let answer = async {
                let resp = req.send().await.ok()?;
                let status = resp.status().as_u16();
                let index = resp
                    .headers()
                    .get("x-registry-index")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match status {
                    200 => {
                        let body: Value = resp.json().await.ok()?;
                        Some(Lookup::Found {
                            urls: instance_urls(&body)?,
                            index,
                        })
                    }
                    404 => Some(Lookup::NotFound),
                    _ => None,
                }
            }
            .await;
            match answer {
                Some(found) => {
                    self.next_node.store(i, Ordering::Relaxed);
                    let result = match &found {
                        Lookup::Found { .. } => "found",
                        Lookup::NotFound => "not_found",
                        Lookup::Failed => "error",
                    };
                    self.metrics
                        .registry_lookups
                        .with_label_values(&[result])
                        .inc();
                    return found;
                }
                None => {
                    self.metrics.registry_failures.inc();
                    tracing::debug!(node = base, service = name, "registry lookup failed");
                }
            }
        }
        self.metrics
            .registry_lookups
            .with_label_values(&["error"])
            .inc();
        Lookup::Failed
    }

    /// Sleeps unless the gateway stops first; false if it stopped.
    async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Keeps one service's route fresh until the registry says it is gone,
    /// nobody asked for it for `watch_idle`, or the gateway stops.
    async fn watch(self: Arc<Self>, name: String) {
        let mut backoff = MIN_WATCH_PERIOD;
        loop {
            let index = {
                let mut entries = self.entries.lock().unwrap();
                match entries.get(&name) {
                    None => return,
                    Some(e) if e.last_used.elapsed() > self.cfg.watch_idle => {
                        entries.remove(&name);
                        self.metrics.cache_size.set(entries.len() as i64);
                        return;
                    }
                    Some(e) => e.route.index.unwrap_or(0),
                }
            };
            let started = Instant::now();
            let mut stop = self.shutdown.clone();
            let answer = tokio::select! {
                a = self.lookup(&name, Some((index, self.cfg.watch_wait))) => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            match answer {
                Lookup::Found { urls, index: new } if !urls.is_empty() => {
                    self.registry_ok();
                    backoff = MIN_WATCH_PERIOD;
                    let changed = {
                        let entries = self.entries.lock().unwrap();
                        let Some(e) = entries.get(&name) else { return };
                        let old: Vec<&str> =
                            e.route.instances.iter().map(|i| i.url.as_str()).collect();
                        old != urls.iter().map(String::as_str).collect::<Vec<_>>()
                    };
                    self.store(&name, urls, new, Source::Registry);
                    let same_index = new.is_none_or(|n| n == index);
                    // The registry may ignore index/wait and answer at once:
                    // never ask more than once a second for nothing new.
                    if started.elapsed() < MIN_WATCH_PERIOD
                        && (same_index || !changed)
                        && !self.pause(MIN_WATCH_PERIOD).await
                    {
                        return;
                    }
                }
                Lookup::Found { .. } | Lookup::NotFound => {
                    self.registry_ok();
                    let mut entries = self.entries.lock().unwrap();
                    entries.remove(&name);
                    self.metrics.cache_size.set(entries.len() as i64);
                    return;
                }
                Lookup::Failed => {
                    self.registry_failed();
                    if !self.pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_WATCH_BACKOFF);
                }
            }
        }
    }

    /// Stops every watch task.
    pub fn stop_watching(&self) {
        let mut entries = self.entries.lock().unwrap();
        for e in entries.values_mut() {
            if let Some(w) = e.watcher.take() {
                w.abort();
            }
        }
    }

    /// Counts a breaker opening for the metrics.
    pub fn breaker_opened(&self, service: &str) {
        self.metrics
            .breaker_opens
            .with_label_values(&[service])
            .inc();
    }

    /// The `/gateway/status` document.
    pub fn status(&self) -> Value {
        let (open, failures, threshold) = {
            let b = self.registry_breaker.lock().unwrap();
            (b.is_open(), b.failures(), b.threshold())
        };
        let entries = self.entries.lock().unwrap();
        let mut names: Vec<&String> = entries.keys().collect();
        names.sort();
        let mut routes = serde_json::Map::new();
        for name in &names {
            let r = &entries[*name].route;
            let instances: Vec<Value> = r
                .instances
                .iter()
                .map(|i| {
                    let b = i.breaker.lock().unwrap();
                    json!({"url": i.url, "breaker": b.name(), "failures": b.failures()})
                })
                .collect();
            let mut route = json!({
                "age_seconds": r.age().as_secs(),
                "source": r.source.name(),
                "instances": instances,
            });
            if let Source::Environment(var) = &r.source {
                route["variable"] = json!(var);
            }
            routes.insert(name.to_string(), route);
        }
        json!({
            "gateway": "operational",
            "version": env!("CARGO_PKG_VERSION"),
            "circuit_breaker": {"open": open, "failures": failures, "threshold": threshold},
            "cache": {
                "size": entries.len(),
                "ttl": self.cfg.cache_ttl.as_secs(),
                "services": names,
            },
            "routes": routes,
        })
    }
}

/// `<NAME>`: the service name upper-cased, `-` and `.` as `_`.
fn env_name(service: &str) -> String {
    service
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// `SERVICE_<NAME>_URL`: upper case, `-` and `.` as `_`.
pub fn env_var_name(service: &str) -> String {
    format!("SERVICE_{}_URL", env_name(service))
}

/// Every environment variable that may name `service`'s URL, in the order
/// they are tried: `SERVICE_<NAME>_URL` (the seed's), then the old
/// gateway's `<NAME>_URL`, `<NAME>_SERVICE_URL`, `<NAME>_ENDPOINT`, then
/// the variables whose old-gateway legacy name (see [`legacy_service_name`])
/// is `service`, i.e. for `x_service` also `X_URL` and `X_ENDPOINT`.
pub fn env_var_names(service: &str) -> Vec<String> {
    let name = env_name(service);
    let mut vars = vec![
        format!("SERVICE_{name}_URL"),
        format!("{name}_URL"),
        format!("{name}_SERVICE_URL"),
        format!("{name}_ENDPOINT"),
    ];
    // `X_SERVICE_URL` and `X_SERVICE_ENDPOINT` are in the list already;
    // `X_URL` and `X_ENDPOINT` name `x_service` too.
    if let Some(base) = name.strip_suffix("_SERVICE").filter(|b| !b.is_empty()) {
        vars.push(format!("{base}_URL"));
        vars.push(format!("{base}_ENDPOINT"));
    }
    let mut seen = HashSet::new();
    vars.retain(|v| seen.insert(v.clone()));
    vars
}

/// The service an environment variable names under the old gateway's
/// legacy mapping: lower-cased, the `_url` or `_endpoint` suffix dropped,
/// `_service` appended unless already there (`MAXIMUS_CORE_SERVICE_URL` and
/// `MAXIMUS_CORE_URL` both name `maximus_core_service`). `None` for a
/// variable without either suffix. [`env_var_names`] is its inverse.
pub fn legacy_service_name(var: &str) -> Option<String> {
    let lower = var.to_ascii_lowercase();
    let base = lower
        .strip_suffix("_url")
        .or_else(|| lower.strip_suffix("_endpoint"))
        .filter(|b| !b.is_empty())?;
    Some(if base.ends_with("_service") {
        base.to_string()
    } else {
        format!("{base}_service")
    })
}

/// A variable's value as an upstream base URL: `http(s)://...` without a
/// trailing `/`. Anything else (empty, `redis://...`, a bare `host:port`)
/// is not a route: the next variable is tried.
fn env_url(value: &str) -> Option<String> {
    let url = value.trim().trim_end_matches('/');
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))?;
    (!rest.is_empty()).then(|| url.to_string())
}

/// The sorted, distinct base URLs of a `GET /services/{name}` body: each
/// instance's `endpoint` (`https://` when it registered one), or, from a
/// registry that gives none, `http://host:port`.
fn instance_urls(body: &Value) -> Option<Vec<String>> {
    let mut urls: Vec<String> = body
        .get("instances")?
        .as_array()?
        .iter()
        .filter_map(|i| {
            if let Some(url) = i.get("endpoint").and_then(Value::as_str).and_then(env_url) {
                return Some(url);
            }
            let host = i.get("host")?.as_str()?;
            let port = i.get("port")?.as_u64()?;
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            Some(format!("http://{host}:{port}"))
        })
        .collect();
    urls.sort();
    urls.dedup();
    Some(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(env_var_name("osint_service"), "SERVICE_OSINT_SERVICE_URL");
        assert_eq!(env_var_name("a-b.c"), "SERVICE_A_B_C_URL");
        assert_eq!(
            env_var_names("maximus_core_service"),
            vec![
                "SERVICE_MAXIMUS_CORE_SERVICE_URL",
                "MAXIMUS_CORE_SERVICE_URL",
                "MAXIMUS_CORE_SERVICE_SERVICE_URL",
                "MAXIMUS_CORE_SERVICE_ENDPOINT",
                "MAXIMUS_CORE_URL",
                "MAXIMUS_CORE_ENDPOINT",
            ]
        );
        assert_eq!(
            env_var_names("a-b.c"),
            vec![
                "SERVICE_A_B_C_URL",
                "A_B_C_URL",
                "A_B_C_SERVICE_URL",
                "A_B_C_ENDPOINT"
            ]
        );
        // No empty base: `_service` alone adds nothing.
        assert_eq!(env_var_names("_service").len(), 4);
    }

    #[test]
    fn legacy_names_and_their_inverse() {
        for (var, service) in [
            ("MAXIMUS_CORE_SERVICE_URL", Some("maximus_core_service")),
            ("MAXIMUS_CORE_URL", Some("maximus_core_service")),
            ("OSINT_SERVICE_ENDPOINT", Some("osint_service")),
            ("NMAP_ENDPOINT", Some("nmap_service")),
            ("PATH", None),
            ("_URL", None),
        ] {
            assert_eq!(legacy_service_name(var).as_deref(), service, "{var}");
        }
        // Every variable whose legacy name is the service is tried.
        for var in [
            "MAXIMUS_CORE_SERVICE_URL",
            "MAXIMUS_CORE_URL",
            "MAXIMUS_CORE_SERVICE_ENDPOINT",
            "MAXIMUS_CORE_ENDPOINT",
        ] {
            let service = legacy_service_name(var).unwrap();
            assert!(env_var_names(&service).contains(&var.to_string()), "{var}");
        }
    }

    #[test]
    fn only_http_urls_are_routes() {
        assert_eq!(env_url(" http://a:1/ ").as_deref(), Some("http://a:1"));
        assert_eq!(env_url("HTTPS://a/x").as_deref(), Some("HTTPS://a/x"));
        for bad in ["", "  ", "http://", "redis://r:6379", "a:80", "/x"] {
            assert_eq!(env_url(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn urls_from_a_registry_answer() {
        let body = json!({"instances": [
            {"host": "10.0.0.2", "port": 80},
            {"host": "::1", "port": 81},
            {"host": "10.0.0.1", "port": 80},
            {"host": "10.0.0.1", "port": 80},
            {"host": "s", "port": 443, "endpoint": "https://s:443"},
        ]});
        assert_eq!(
            instance_urls(&body).unwrap(),
            vec![
                "http://10.0.0.1:80",
                "http://10.0.0.2:80",
                "http://[::1]:81",
                "https://s:443"
            ]
        );
        assert!(instance_urls(&json!({})).is_none());
    }
}
