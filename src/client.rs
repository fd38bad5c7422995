//! Client-side helpers shared by `probe`, the tests and the benchmarks: a minimal
//! HTTP/1.1 GET and the identity API fetch.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::api::IdentityResponse;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}: response body: {reason}")]
    Body { url: String, reason: String },
    #[error("{url}: timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: invalid identity JSON: {source}")]
    Json {
        url: String,
        source: serde_json::Error,
    },
}

/// A response: status, content type and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

/// Parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path_and_query: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let bad = |reason: &str| HttpError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: axum::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(bad(&format!("scheme {other} is not supported (use http)"))),
            None => return Err(bad("missing http:// scheme")),
        }
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(80),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
        })
    }

    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, HttpError> {
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map(|a| a.collect())
            .map_err(|source| HttpError::Resolve {
                host: self.host.clone(),
                source,
            })
    }
}

/// `GET url` with `method`, reading at most 1 MiB of body, all within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let parsed = HttpUrl::parse(url)?;
    let fut = async {
        let addrs = parsed.resolve().await?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some((addr, source))) => return Err(HttpError::Connect { addr, source }),
            (None, None) => {
                return Err(HttpError::Resolve {
                    host: parsed.host.clone(),
                    source: std::io::Error::other("no addresses"),
                });
            }
        };
        let http = |source| HttpError::Http {
            url: url.to_owned(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let host_header = if parsed.host.contains(':') {
            format!("[{}]:{}", parsed.host, parsed.port)
        } else {
            format!("{}:{}", parsed.host, parsed.port)
        };
        let req = Request::builder()
            .method(method)
            .uri(&parsed.path_and_query)
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, crate::defaults::AGENT_VERSION)
            .body(Empty::<Bytes>::new())
            .map_err(|e| HttpError::Url {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| HttpError::Body {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .to_bytes()
            .to_vec();
        conn.abort();
        Ok(HttpResponse {
            status,
            content_type,
            headers,
            body,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout {
            url: url.to_owned(),
            timeout,
        })?
}

/// Fetch and parse `GET <base>/api/v1/identity`. `base` may already end in that path.
pub async fn fetch_identity(base: &str, timeout: Duration) -> Result<IdentityResponse, HttpError> {
    let url = identity_url(base);
    let resp = request("GET", &url, timeout).await?;
    if resp.status != 200 {
        return Err(HttpError::Status {
            url,
            status: resp.status,
        });
    }
    serde_json::from_slice(&resp.body).map_err(|source| HttpError::Json { url, source })
}

pub fn identity_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/api/v1/identity") {
        base.to_owned()
    } else {
        format!("{base}/api/v1/identity")
    }
}
