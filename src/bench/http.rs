//! A lean HTTP/1.1 client for the load driver: one keep-alive connection per
//! bench client and node, straight on hyper's connection API. No pool, no
//! redirects, no decompression, no per-request URL parsing: on two cores
//! shared with the nodes under test, what the driver spends is what the
//! nodes lack: against three nodes with 32 clients (lookup), a shared
//! `reqwest` client cost the driver 60-67 µs of CPU per request, this one
//! 34-36 µs.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One node as the driver sees it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, to connect to and for the `Host` header.
    pub authority: String,
    /// The URL's path and query, for the `get` workload ("/" if none).
    pub path: String,
    /// The URL as given, for reports.
    pub url: String,
}

impl Target {
    /// Parses `http://host:port[/path]`. Plain HTTP only.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("bad target URL {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                anyhow::bail!("target {url}: scheme {other} is not supported (plain http only)")
            }
            None => anyhow::bail!("target {url:?}: give a URL such as http://127.0.0.1:8888"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("target {url:?} has no host"))?
            .to_string();
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority
        } else {
            format!("{authority}:80")
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Self {
            authority,
            path,
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// An answer: status, headers and the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `Ok` for a 2xx, else an error naming the status and the body's start.
    pub fn ok(self) -> anyhow::Result<Self> {
        if self.status.is_success() {
            Ok(self)
        } else {
            let body = String::from_utf8_lossy(&self.body[..self.body.len().min(200)]).into_owned();
            anyhow::bail!("{} {}", self.status.as_u16(), body.trim())
        }
    }

    /// The `X-Registry-Index` header, if present and a number.
    pub fn index(&self) -> Option<u64> {
        self.headers
            .get("x-registry-index")?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }
}

/// A keep-alive connection to one node, opened on first use and again after
/// any error.
pub struct Conn {
    target: Target,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub fn new(target: Target, token: Option<&str>, timeout: Duration) -> Self {
        let host =
            HeaderValue::from_str(&target.authority).expect("an authority is a header value");
        let auth = token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok());
        Self {
            target,
            host,
            auth,
            timeout,
            sender: None,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, json: String) -> anyhow::Result<Answer> {
        self.send(Method::POST, path, Some(Bytes::from(json))).await
    }

    /// `DELETE path`.
    pub async fn delete(&mut self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::DELETE, path, None).await
    }

    /// Sends one request and reads the whole answer, within the timeout. On
    /// any error the connection is dropped (the next request opens another).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Answer> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                anyhow::bail!("no answer within {:?}", self.timeout)
            }
        }
    }

    /// Sends until a 2xx answer, at most `tries` times and not after
    /// `deadline`, 50 ms apart; the last error if none.
    pub async fn retry(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        tries: usize,
        deadline: Instant,
    ) -> anyhow::Result<Answer> {
        let mut tried = 0;
        loop {
            tried += 1;
            match self
                .send(method.clone(), path, body.clone())
                .await
                .and_then(Answer::ok)
            {
                Ok(a) => return Ok(a),
                Err(e) if tried >= tries || Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Answer> {
        let mut req = Request::builder().method(method).uri(path);
        let headers = req.headers_mut().expect("a fresh builder has headers");
        headers.insert(HOST, self.host.clone());
        if let Some(a) = &self.auth {
            headers.insert(AUTHORIZATION, a.clone());
        }
        if body.is_some() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        let sender = match &mut self.sender {
            Some(s) if !s.is_closed() => s,
            _ => self.sender.insert(self.connect().await?),
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(&self.target.authority)
            .await
            .map_err(|e| anyhow::anyhow!("connect {}: {e}", self.target.authority))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the peer closes or the sender is dropped.
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = Target::parse("http://127.0.0.1:8888").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("127.0.0.1:8888", "/")
        );
        let t = Target::parse("http://localhost/v2/demo/echo?x=1").unwrap();
        assert_eq!(t.authority, "localhost:80");
        assert_eq!(t.path, "/v2/demo/echo?x=1");
        let t = Target::parse("http://[::1]:9000/").unwrap();
        assert_eq!(t.authority, "[::1]:9000");
        assert_eq!(t.url, "http://[::1]:9000");
        assert!(Target::parse("https://127.0.0.1:8888").is_err());
        assert!(Target::parse("127.0.0.1:8888").is_err());
    }
}
