//! TLS with rustls: the node's (and the gateway's) listener, and the
//! node-to-node client, with certificates reloaded when their files change.
//!
//! - `--tls-cert` and `--tls-key` (PEM) turn the listener into HTTPS only.
//!   A plain HTTP request on it gets a `400` saying to use `https://`.
//! - `--tls-ca` (PEM, one or more certificates) turns on mutual TLS between
//!   nodes: the node presents its own certificate when it calls another
//!   node and trusts only that CA for peers, and the listener asks every
//!   client for a certificate signed by it. Clients without a certificate
//!   (services, operators) may still connect to the public API; the
//!   node-to-node routes (`/raft/*`) refuse them with `403`. A certificate
//!   that does not verify fails the handshake.
//! - Without `--tls-ca`, peers are verified against the public web roots
//!   (webpki-roots), for certificates from a public CA.
//!
//! Every [`RELOAD_CHECK`] the files are read again; when their bytes
//! changed and they form a valid pair, new connections use them (open
//! connections keep theirs). A bad set of files is logged and counted, and
//! the old certificates stay in force. `SIGHUP` reloads at once.
//!
//! The node-to-node client is built once: its certificate resolver and its
//! verifier read the current material on every handshake, so a reload needs
//! no new connection pool.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The three files, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Checks that the flags come as a set: both of cert and key, or none
    /// (and no CA without them). `None` means plain HTTP.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.map(Path::to_path_buf),
            })),
            (None, None) if ca.is_none() => Ok(None),
            (None, None) => Err(
                "--tls-ca needs --tls-cert and --tls-key too (mutual TLS between nodes: each \
                 node presents its own certificate)"
                    .into(),
            ),
            (Some(_), None) => Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => Err("--tls-key needs --tls-cert".into()),
        }
    }
}

/// The bytes of one reading of the files.
#[derive(PartialEq, Eq)]
struct Pems {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

/// What was loaded from one reading of the files.
struct Material {
    /// What it was built from, to tell whether the files changed.
    pems: Pems,
    key: Arc<CertifiedKey>,
    server: Arc<ServerConfig>,
    /// Verifies peers' certificates when this node calls them.
    peer_verifier: Arc<WebPkiServerVerifier>,
    /// Whether clients are asked for a certificate (a CA was given).
    mutual: bool,
}

/// The live TLS settings of one listener and its outgoing client.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Material>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .field("mutual", &self.mutual())
            .finish()
    }
}

/// The result of a reload check.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn certs(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pems = Self::read_all(&files)?;
        let material = Self::build(&files, &provider, pems)?;
        Ok(Arc::new(Self {
            files,
            provider,
            current: RwLock::new(Arc::new(material)),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether a CA was given: peers must then present a certificate.
    pub fn mutual(&self) -> bool {
        self.material().mutual
    }

    fn material(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server settings for the next connection.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server.clone()
    }

    fn read_all(files: &TlsFiles) -> Result<Pems, String> {
        Ok(Pems {
            cert: read(&files.cert, "certificate (--tls-cert)")?,
            key: read(&files.key, "private key (--tls-key)")?,
            ca: match &files.ca {
                Some(ca) => Some(read(ca, "CA certificate (--tls-ca)")?),
                None => None,
            },
        })
    }

    /// Builds from the bytes read, so what is compared on the next check
    /// is exactly what is in force.
    fn build(
        files: &TlsFiles,
        provider: &Arc<CryptoProvider>,
        pems: Pems,
    ) -> Result<Material, String> {
        let chain = certs(&pems.cert, &files.cert, "certificate (--tls-cert)")?;
        let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|e| {
            format!(
                "the private key (--tls-key) {} holds no usable PEM key (PKCS#8, PKCS#1 or SEC1): {e}",
                files.key.display()
            )
        })?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            format!(
                "the private key {} does not fit the certificate {}: {e}",
                files.key.display(),
                files.cert.display()
            )
        })?;
        let key = Arc::new(key);

        let roots = match (&files.ca, &pems.ca) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for c in certs(pem, path, "CA certificate (--tls-ca)")? {
                    roots.add(c).map_err(|e| {
                        format!("the CA certificate {} is not usable: {e}", path.display())
                    })?;
                }
                roots
            }
            _ => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let roots = Arc::new(roots);
        let mutual = files.ca.is_some();

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?;
        let builder = if mutual {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("client certificate verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut server = builder.with_cert_resolver(Arc::new(FixedKey(key.clone())));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];

        let peer_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| format!("server certificate verifier: {e}"))?;
        Ok(Material {
            pems,
            key,
            server: Arc::new(server),
            peer_verifier,
            mutual,
        })
    }

    /// Reads the files again and, when they changed and are valid, makes
    /// them current. On an error the old material stays.
    pub fn reload(&self) -> Result<Reload, String> {
        let pems = Self::read_all(&self.files)?;
        if pems == self.material().pems {
            return Ok(Reload::Unchanged);
        }
        let material = Self::build(&self.files, &self.provider, pems)?;
        if material.mutual != self.mutual() {
            return Err("mutual TLS cannot be turned on or off by a reload".into());
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        Ok(Reload::Reloaded)
    }

    /// Client settings for node-to-node requests: this node's certificate
    /// when a peer asks for one, and peers verified against the CA (or the
    /// web roots), both as currently loaded.
    pub fn client_config(self: &Arc<Self>) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the default protocol versions are supported by ring")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CurrentVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(CurrentKey(self.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// Checks the files every [`RELOAD_CHECK`] until `stop` turns true.
    /// `on_result` is told about every reload that was tried.
    pub async fn watch_files(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        on_result: impl Fn(&Result<Reload, String>) + Send + 'static,
    ) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(RELOAD_CHECK) => {}
            }
            let me = self.clone();
            let result = tokio::task::spawn_blocking(move || me.reload())
                .await
                .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
            match &result {
                Ok(Reload::Unchanged) => {
                    last_error = None;
                    continue;
                }
                Ok(Reload::Reloaded) => {
                    last_error = None;
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed: reloaded");
                }
                // Files being replaced one by one fail for a moment: say it
                // once per distinct error, not every second.
                Err(e) if last_error.as_ref() != Some(e) => {
                    tracing::error!(error = %e, "TLS certificate files changed but cannot be used; the old ones stay in force");
                    last_error = Some(e.clone());
                }
                Err(_) => continue,
            }
            on_result(&result);
        }
    }
}

/// Serves the one certificate of a material.
#[derive(Debug)]
struct FixedKey(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Presents the node's current certificate to a peer that asks.
#[derive(Debug)]
struct CurrentKey(Arc<Tls>);

impl ResolvesClientCert for CurrentKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.material().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a peer with the current CA (webpki's verifier, swapped on reload).
#[derive(Debug)]
struct CurrentVerifier(Arc<Tls>);

impl CurrentVerifier {
    /// The verifier of the CA in force now.
    fn now(&self) -> Arc<WebPkiServerVerifier> {
        self.0.material().peer_verifier.clone()
    }
}

impl ServerCertVerifier for CurrentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.now()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.now().supported_verify_schemes()
    }
}

/// TLS settings of an HTTP client of the registry (the client library,
/// the gateway, the `cluster` subcommand): extra CA certificates to trust
/// (beyond the public web roots), and optionally a client certificate.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM certificates to trust, e.g. the cluster's `--tls-ca`.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain followed by its private key, presented when a
    /// server asks for a client certificate.
    pub identity_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.as_ref().map(|c| c.len()))
            .field(
                "identity",
                &self.identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl ClientTls {
    /// Reads a CA file (and optionally a certificate and key) given on a
    /// command line.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, String> {
        let ca_pem = match ca {
            Some(p) => Some(read(p, "CA certificate (--tls-ca)")?),
            None => None,
        };
        let identity_pem = match (cert, key) {
            (Some(c), Some(k)) => {
                let mut pem = read(c, "certificate")?;
                pem.push(b'\n');
                pem.extend(read(k, "private key")?);
                Some(pem)
            }
            (None, None) => None,
            _ => return Err("a client certificate needs both its certificate and its key".into()),
        };
        Ok(Self {
            ca_pem,
            identity_pem,
        })
    }

    /// Applies the settings to a `reqwest` client under construction.
    pub fn apply(&self, mut b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, String> {
        if let Some(pem) = &self.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("the CA certificate is not valid PEM: {e}"))?;
            if certs.is_empty() {
                return Err("the CA file holds no PEM certificate".into());
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if let Some(pem) = &self.identity_pem {
            let id = reqwest::Identity::from_pem(pem)
                .map_err(|e| format!("the client certificate or key is not usable: {e}"))?;
            b = b.identity(id);
        }
        Ok(b)
    }
}

/// Marks a request that came over a TLS connection whose client presented
/// a certificate that verified against `--tls-ca`.
#[derive(Debug, Clone, Copy)]
pub struct PeerCertified;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_as_a_set() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None), Ok(None));
        assert!(TlsFiles::from_flags(p("c").as_deref(), None, None).is_err());
        assert!(TlsFiles::from_flags(None, p("k").as_deref(), None).is_err());
        assert!(TlsFiles::from_flags(None, None, p("ca").as_deref()).is_err());
        let f = TlsFiles::from_flags(p("c").as_deref(), p("k").as_deref(), p("ca").as_deref())
            .unwrap()
            .unwrap();
        assert_eq!(f.ca, p("ca"));
    }

    #[test]
    fn missing_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
        };
        let e = Tls::load(files.clone()).unwrap_err();
        assert!(e.contains("cannot read the certificate"), "{e}");
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = Tls::load(files).unwrap_err();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }
}
