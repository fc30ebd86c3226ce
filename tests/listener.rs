//! The node's listener: TLS (HTTPS only, mutual TLS between nodes, reload
//! without restart) and connection caps. Certificates are made at run time
//! with rcgen, in temp dirs.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{metric, raw, raw_request, wait_for, TestCluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vertice_register::client::{ClientOptions, Registration, RegistryClient};
use vertice_register::tls::ClientTls;

/// A test CA and the certificates it signs, as PEM files in a temp dir.
struct Pki {
    dir: TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A certificate and key written to files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    cert_der: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn ca_pem(&self) -> Vec<u8> {
        self.ca.pem().into_bytes()
    }

    /// A certificate for 127.0.0.1 and localhost, for servers and clients,
    /// written (over any earlier one) to `{name}.pem` and `{name}-key.pem`.
    fn issue(&self, name: &str) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
            cert_der: cert.der().to_vec(),
        };
        // Key first: a reload between the two writes then fails (mismatch)
        // and is retried, instead of pairing a new certificate with an old key.
        write_atomically(&issued.key, key.serialize_pem().as_bytes());
        write_atomically(&issued.cert, cert.pem().as_bytes());
        issued
    }
}

/// Writes through a temp file and a rename, as certificate managers do.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A reqwest client that trusts only `ca` (and presents `identity`).
fn https_client(ca: &[u8], identity: Option<&Issued>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap())
        .timeout(Duration::from_secs(15));
    if let Some(id) = identity {
        let mut pem = std::fs::read(&id.cert).unwrap();
        pem.extend(std::fs::read(&id.key).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

/// Three nodes with their own certificates from `pki`, mutual TLS on.
async fn tls_cluster(pki: &Pki) -> TestCluster {
    let certs: Vec<(PathBuf, PathBuf)> = (1..=3)
        .map(|id| {
            let i = pki.issue(&format!("node{id}"));
            (i.cert, i.key)
        })
        .collect();
    let ca = pki.ca_path();
    let mut c = TestCluster::start_tuned(
        3,
        Arc::new(move |a| {
            let (cert, key) = &certs[(a.id - 1) as usize];
            a.tls_cert = Some(cert.clone());
            a.tls_key = Some(key.clone());
            a.tls_ca = Some(ca.clone());
        }),
    )
    .await;
    c.scheme = "https";
    c.http = https_client(&pki.ca_pem(), None);
    c
}

/// The certificate a server presents to a new TLS connection.
async fn presented_cert(addr: SocketAddr, ca: &[u8]) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_run_on_mutual_tls() {
    let pki = Pki::new("cluster CA");
    let c = tls_cluster(&pki).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);

    // A write through a follower is forwarded over mutual TLS, and the
    // entry reaches every node over it.
    c.register(follower, "payments", 8080).await;
    for id in 1..=3 {
        let body = c.wait_for_service(id, "payments").await;
        assert_eq!(body["instances"][0]["port"], 8080, "node {id}: {body}");
    }

    // The client library speaks HTTPS when given the CA.
    let client = RegistryClient::with_options(
        (1..=3).map(|id| c.url(id)),
        ClientOptions {
            tls: ClientTls {
                ca_pem: Some(pki.ca_pem()),
                identity_pem: None,
            },
            ..Default::default()
        },
    )
    .unwrap();
    let inst = client
        .register(&Registration {
            service_name: "orders".into(),
            host: Some("10.0.0.9".into()),
            port: 9000,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .heartbeat("orders", Some(&inst.instance_id))
        .await
        .unwrap();
    let svc = client.service_consistent("orders").await.unwrap();
    assert_eq!(svc.instances.len(), 1);

    // Without the CA, the client refuses the nodes' certificates.
    let untrusting = RegistryClient::with_options(
        [c.url(leader)],
        ClientOptions {
            retry_budget: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .unwrap();
    match untrusting.service("orders").await {
        Err(vertice_register::client::ClientError::Unavailable(why)) => {
            assert!(why.contains("certificate"), "{why}")
        }
        other => panic!("expected a refused certificate, got {other:?}"),
    }

    // Plain HTTP on the HTTPS port: a clear 400, not a hang or garbage.
    let (code, body) = raw(
        c.addrs[&leader],
        raw_request(c.addrs[&leader], "GET", "/health"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("https://"), "{body}");

    // /raft/* with the secret but without a client certificate: 403.
    let r = c
        .http
        .post(format!("{}/raft/vote", c.url(leader)))
        .header("x-cluster-secret", common::SECRET)
        .body(vec![0u8; 4])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("client certificate"),
        "{body}"
    );

    // With a certificate from the cluster CA it passes that check (the
    // empty body is then refused as a bad request, not as forbidden).
    let node_like = pki.issue("tool");
    let r = https_client(&pki.ca_pem(), Some(&node_like))
        .post(format!("{}/raft/vote", c.url(leader)))
        .header("x-cluster-secret", common::SECRET)
        .body(vec![0u8; 4])
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), StatusCode::FORBIDDEN);
    assert_ne!(r.status(), StatusCode::UNAUTHORIZED);

    // A certificate from another CA fails the handshake itself.
    let rogue = Pki::new("rogue CA");
    let rogue_id = rogue.issue("rogue");
    let r = https_client(&pki.ca_pem(), Some(&rogue_id))
        .get(format!("{}/health", c.url(leader)))
        .send()
        .await;
    // Refused by TLS itself (an alert from the node), not by anything else.
    match r {
        Err(e) => {
            let why = vertice_register::http::error_chain(&e);
            assert!(
                why.contains("alert") || why.contains("certificate"),
                "{why}"
            )
        }
        Ok(r) => panic!("a foreign client certificate was accepted: {}", r.status()),
    }

    let m = c.metrics(leader).await;
    assert!(
        metric(
            &m,
            "registry_connections_refused_total{reason=\"plain_http\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "registry_connections_refused_total{reason=\"tls_handshake\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            "registry_auth_refused_total{reason=\"peer_certificate\"}"
        ) >= 1.0
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_are_reloaded_without_a_restart() {
    let pki = Pki::new("cluster CA");
    let c = tls_cluster(&pki).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    let addr = c.addrs[&follower];
    let before = presented_cert(addr, &pki.ca_pem()).await;

    // Renew the follower's certificate (new key too), as cert-manager would.
    let renewed = pki.issue(&format!("node{follower}"));
    assert_ne!(renewed.cert_der, before);
    wait_for(
        "the renewed certificate",
        Duration::from_secs(15),
        || async { (presented_cert(addr, &pki.ca_pem()).await == renewed.cert_der).then_some(()) },
    )
    .await;
    let m = c.metrics(follower).await;
    assert!(
        metric(&m, "registry_tls_reloads_total{result=\"ok\"}") >= 1.0,
        "{m}"
    );

    // The cluster keeps working through the renewed node: forwarding to the
    // leader and replication back over new connections.
    c.register(follower, "after-renewal", 7000).await;
    for id in 1..=3 {
        c.wait_for_service(id, "after-renewal").await;
    }

    // A broken file is refused; the last good certificate stays in force.
    std::fs::write(&renewed.cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    wait_for(
        "a failed reload to be counted",
        Duration::from_secs(15),
        || async {
            let m = c.metrics(follower).await;
            (metric(&m, "registry_tls_reloads_total{result=\"error\"}") >= 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(presented_cert(addr, &pki.ca_pem()).await, renewed.cert_der);
    let (status, _, _) = c.get(follower, "/services/after-renewal").await;
    assert_eq!(status, StatusCode::OK);
    c.shutdown().await;
}

#[tokio::test]
async fn tls_flags_are_checked_at_start() {
    use vertice_register::config::NodeArgs;
    use vertice_register::node::RunningNode;
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let node = pki.issue("n");
    let other = pki.issue("other");
    type Tune<'a> = Box<dyn Fn(&mut NodeArgs) + 'a>;
    let cases: Vec<(Tune, &str)> = vec![
        (
            Box::new(|a: &mut NodeArgs| a.tls_cert = Some(node.cert.clone())),
            "--tls-cert needs --tls-key",
        ),
        (
            Box::new(|a: &mut NodeArgs| a.tls_ca = Some(pki.ca_path())),
            "--tls-ca needs --tls-cert and --tls-key",
        ),
        (
            Box::new(|a: &mut NodeArgs| {
                a.tls_cert = Some(node.cert.clone());
                a.tls_key = Some(other.key.clone());
            }),
            "does not fit the certificate",
        ),
        (
            Box::new(|a: &mut NodeArgs| {
                a.tls_cert = Some(node.cert.clone());
                a.tls_key = Some(dir.path().join("missing.pem"));
            }),
            "cannot read the private key",
        ),
    ];
    // Not TLS, but a start-up refusal of the same kind: several voters
    // without a cluster secret.
    let mut cases = cases;
    cases.push((
        Box::new(|a: &mut NodeArgs| {
            a.peers =
                Some(vertice_register::config::parse_peers("1=127.0.0.1:1,2=127.0.0.1:2").unwrap())
        }),
        "needs --cluster-secret",
    ));
    for (tune, expected) in cases {
        let mut a = NodeArgs {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        tune(&mut a);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = RunningNode::start(a, l)
            .await
            .err()
            .expect("start must fail");
        assert!(
            e.to_string().contains(expected),
            "{e} (expected: {expected})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_caps_refuse_at_once_with_a_clear_answer() {
    let c = TestCluster::start_with(1, |a| {
        a.max_connections_per_ip = 2;
        a.max_connections = 4;
    })
    .await;
    c.wait_for_leader().await;
    let addr = c.addrs[&1];

    // Two idle connections from 127.0.0.1 fill its share.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    let poll_answer = |from: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        let _ = s
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    };
    let third = wait_for("the per-address cap", Duration::from_secs(10), || async {
        let a = poll_answer("127.0.0.1").await;
        a.starts_with("HTTP/1.1 429").then_some(a)
    })
    .await;
    assert!(third.contains("Retry-After: 1"), "{third}");
    assert!(third.contains("connections open"), "{third}");

    // Another address still gets in.
    let other = poll_answer("127.0.0.2").await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");

    // Filling the node's total: two more held from 127.0.0.3 make four.
    let hold = |from: &'static str| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        sock.connect(addr).await.unwrap()
    };
    let _c = hold("127.0.0.3").await;
    let _d = hold("127.0.0.3").await;
    let full = wait_for("the total cap", Duration::from_secs(10), || async {
        let a = poll_answer("127.0.0.4").await;
        a.starts_with("HTTP/1.1 503").then_some(a)
    })
    .await;
    assert!(full.contains("its limit"), "{full}");

    // Closing connections frees places.
    drop((_a, _b, _c, _d));
    wait_for("a free place", Duration::from_secs(10), || async {
        poll_answer("127.0.0.1")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    // From an address of its own: the cluster's pooled client on 127.0.0.1
    // counts towards that address's cap.
    let m = common::get_text(
        &common::client_from("127.0.0.5"),
        &format!("{}/metrics", c.url(1)),
    )
    .await;
    assert!(metric(&m, "registry_connections_refused_total{reason=\"per_ip\"}") >= 1.0);
    assert!(metric(&m, "registry_connections_refused_total{reason=\"total\"}") >= 1.0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_and_the_cluster_command_speak_tls() {
    let pki = Pki::new("cluster CA");
    let c = tls_cluster(&pki).await;
    let leader = c.wait_for_leader().await;

    // An upstream instance, registered over HTTPS.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(|| async { "hello from upstream" });
    let server = tokio::spawn(async move { axum::serve(upstream, app).await });
    let (status, body) = c
        .post(
            leader,
            "/register",
            &json!({"service_name": "web", "host": "127.0.0.1", "port": port}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The gateway may ask any node (a default, local read): wait until every
    // node has applied the registration, or a lagging one answers 404.
    for id in 1..=3 {
        c.wait_for_service(id, "web").await;
    }

    let mut config =
        vertice_register::gateway::GatewayConfig::new((1..=3).map(|id| c.url(id)).collect());
    config.tls = ClientTls {
        ca_pem: Some(pki.ca_pem()),
        identity_pem: None,
    };
    // The gateway's own listener on HTTPS too.
    let gw_cert = pki.issue("gateway");
    config.listener_tls = Some(
        vertice_register::tls::Tls::load(vertice_register::tls::TlsFiles {
            cert: gw_cert.cert.clone(),
            key: gw_cert.key.clone(),
            ca: None,
        })
        .unwrap(),
    );
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = vertice_register::gateway::start(gw_listener, config)
        .await
        .unwrap();
    let r = https_client(&pki.ca_pem(), None)
        .get(format!("https://{}/v2/web/anything", gw.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "hello from upstream");
    let (code, body) = raw(gw.addr, raw_request(gw.addr, "GET", "/health")).await;
    assert_eq!(code, 400, "{body}");
    gw.shutdown().await;

    // `cluster status` over HTTPS with --tls-ca.
    let args = vertice_register::config::ClusterArgs {
        action: vertice_register::config::ClusterAction::Status,
        remote: vertice_register::config::RemoteArgs {
            registry: vec![c.url(leader)],
            cluster_secret: Some(common::SECRET.into()),
            token: None,
            tls_ca: Some(pki.ca_path()),
        },
    };
    let out = vertice_register::admin::run(&args).await.unwrap();
    assert!(out.contains("leader"), "{out}");
    server.abort();
    c.shutdown().await;
}
