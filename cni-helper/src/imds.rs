//! A minimal IMDSv2 client over a blocking `TcpStream` (HTTP/1.1, `Connection: close`).
//!
//! A CNI plugin is a short-lived process: no async runtime, no TLS (IMDS is plain HTTP on a
//! link-local address), a few small requests with tight timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The default endpoint.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// Environment variable the AWS SDKs honour for the endpoint.
pub const ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";
/// Environment variable that turns IMDS off (as in the AWS SDKs).
pub const DISABLED_ENV: &str = "AWS_EC2_METADATA_DISABLED";
/// Token TTL requested (seconds): the plugin only lives for one call.
const TOKEN_TTL: &str = "60";
/// Per-connection connect and I/O timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response accepted.
const MAX_RESPONSE: u64 = 1 << 20;

/// IMDS errors.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// The endpoint is not an `http://host[:port]` URL.
    #[error("invalid IMDS endpoint {0:?}: expected http://host[:port]")]
    Endpoint(String),
    /// Turned off by the environment.
    #[error("disabled by {DISABLED_ENV}=true")]
    Disabled,
    /// Network failure.
    #[error("{what} {endpoint}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The endpoint.
        endpoint: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Malformed HTTP.
    #[error("malformed HTTP response from {0}")]
    Http(String),
    /// A non-success status.
    #[error("{method} {path}: HTTP {status}")]
    Status {
        /// The method.
        method: &'static str,
        /// The path.
        path: String,
        /// The status.
        status: u16,
    },
    /// A metadata value that is not what IMDS documents.
    #[error("{path}: unexpected value {value:?}")]
    Value {
        /// The path.
        path: String,
        /// The value.
        value: String,
    },
}

/// A parsed `http://host[:port]` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host as written (IPv6 in brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses an endpoint URL.
    pub fn parse(url: &str) -> Result<Self, ImdsError> {
        let bad = || ImdsError::Endpoint(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (inside, after) = v6.split_once(']').ok_or_else(bad)?;
            if inside.is_empty() {
                return Err(bad());
            }
            let port = match after {
                "" => 80,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(bad)?,
            };
            (format!("[{inside}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None => (authority.to_owned(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self { host, port })
    }

    fn addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        Ok((host, self.port).to_socket_addrs()?.collect())
    }

    fn authority(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.authority())
    }
}

/// The endpoint to use: config, else the environment, else the default.
pub fn endpoint_from(config: Option<&str>, env: Option<&str>) -> String {
    config
        .or(env.filter(|s| !s.is_empty()))
        .unwrap_or(DEFAULT_ENDPOINT)
        .to_owned()
}

/// One ENI as IMDS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsEni {
    /// MAC (lower case).
    pub mac: String,
    /// `device-number`.
    pub device_number: u64,
    /// `network-card-index` (0 when IMDS does not have it).
    pub network_card_index: u64,
}

/// Metadata source (a trait so tests can stub it).
pub trait Metadata {
    /// Where the metadata comes from (for messages).
    fn describe(&self) -> String;
    /// Finds the ENI at `device_index` on `network_card_index`; also returns every ENI seen.
    fn find(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<(Option<ImdsEni>, Vec<ImdsEni>), ImdsError>;
}

/// IMDSv2 over HTTP.
#[derive(Debug, Clone)]
pub struct Imds {
    endpoint: Endpoint,
}

impl Imds {
    /// A client for `url`.
    pub fn new(url: &str) -> Result<Self, ImdsError> {
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
        })
    }

    fn request(
        &self,
        method: &'static str,
        path: &str,
        header: (&str, &str),
    ) -> Result<(u16, String), ImdsError> {
        let ep = self.endpoint.to_string();
        let io = |what: &'static str| {
            let ep = ep.clone();
            move |source| ImdsError::Io {
                what,
                endpoint: ep,
                source,
            }
        };
        let addrs = self.endpoint.addrs().map_err(io("resolving"))?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut stream = stream.ok_or_else(|| io("connecting to")(last))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(io("configuring connection to"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cni-helper\r\nAccept: */*\r\n{}: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.endpoint.authority(),
            header.0,
            header.1
        );
        stream.write_all(req.as_bytes()).map_err(io("writing to"))?;
        // Read until the response is complete (or the server closes): do not depend on the
        // server honouring `Connection: close`.
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).map_err(io("reading from"))?;
            raw.extend_from_slice(&buf[..n]);
            if n == 0 || response_complete(&raw) || raw.len() as u64 > MAX_RESPONSE {
                break;
            }
        }
        parse_response(&raw).ok_or(ImdsError::Http(ep))
    }

    fn token(&self) -> Result<String, ImdsError> {
        let path = "/latest/api/token";
        match self.request(
            "PUT",
            path,
            ("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL),
        )? {
            (200, body) => Ok(body.trim().to_owned()),
            (status, _) => Err(ImdsError::Status {
                method: "PUT",
                path: path.into(),
                status,
            }),
        }
    }

    fn get(&self, token: &str, path: &str) -> Result<Option<String>, ImdsError> {
        match self.request("GET", path, ("X-aws-ec2-metadata-token", token))? {
            (200, body) => Ok(Some(body)),
            (404, _) => Ok(None),
            (status, _) => Err(ImdsError::Status {
                method: "GET",
                path: path.into(),
                status,
            }),
        }
    }

    fn number(&self, token: &str, path: &str) -> Result<Option<u64>, ImdsError> {
        match self.get(token, path)? {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| ImdsError::Value {
                path: path.to_owned(),
                value: v,
            }),
        }
    }
}

const MACS: &str = "/latest/meta-data/network/interfaces/macs/";

impl Metadata for Imds {
    fn describe(&self) -> String {
        format!("IMDS at {}", self.endpoint)
    }

    fn find(
        &self,
        device_index: u64,
        network_card_index: u64,
    ) -> Result<(Option<ImdsEni>, Vec<ImdsEni>), ImdsError> {
        let token = self.token()?;
        let list = self.get(&token, MACS)?.unwrap_or_default();
        let mut seen = Vec::new();
        for mac in parse_mac_list(&list) {
            let Some(device_number) = self.number(&token, &format!("{MACS}{mac}/device-number"))?
            else {
                continue;
            };
            let card = self
                .number(&token, &format!("{MACS}{mac}/network-card-index"))?
                .unwrap_or(0);
            let eni = ImdsEni {
                mac,
                device_number,
                network_card_index: card,
            };
            if device_number == device_index && card == network_card_index {
                return Ok((Some(eni), seen));
            }
            seen.push(eni);
        }
        Ok((None, seen))
    }
}

/// Parses the `macs/` listing (`02:..:ff/` per line).
pub fn parse_mac_list(body: &str) -> Vec<String> {
    body.lines()
        .map(|l| l.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|l| !l.is_empty() && !l.contains(['/', '.', ' ']))
        .collect()
}

/// Whether `raw` holds a whole response (by Content-Length, or the last chunk). Without
/// either, only the server closing the connection ends it.
pub fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&raw[..split]) else {
        return true; // malformed: stop reading, parsing will fail
    };
    let body = &raw[split + 4..];
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("content-length") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if k.trim().eq_ignore_ascii_case("transfer-encoding")
            && v.trim().eq_ignore_ascii_case("chunked")
        {
            return dechunk(body).is_some();
        }
    }
    false
}

/// Parses a raw HTTP/1.x response into status and body (Content-Length or chunked).
pub fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let (k, v) = line.split_once(':')?;
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().ok()?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)?.to_vec()
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8(body).ok()?))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&body[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
#[path = "../tests/common/fake_imds.rs"]
pub(crate) mod fake_imds;

#[cfg(test)]
mod tests {
    use super::fake_imds::FakeImds;
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("http://169.254.169.254").expect("ok"),
            Endpoint {
                host: "169.254.169.254".into(),
                port: 80
            }
        );
        let e = Endpoint::parse("http://127.0.0.1:8080/").expect("ok");
        assert_eq!(e.port, 8080);
        assert_eq!(e.to_string(), "http://127.0.0.1:8080");
        let e = Endpoint::parse("http://[fd00:ec2::254]").expect("ok");
        assert_eq!(e.host, "[fd00:ec2::254]");
        assert_eq!(Endpoint::parse("http://[::1]:81").expect("ok").port, 81);
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://h:notaport",
            "http://h/path",
            "http://[::1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_precedence() {
        assert_eq!(
            endpoint_from(Some("http://a"), Some("http://b")),
            "http://a"
        );
        assert_eq!(endpoint_from(None, Some("http://b")), "http://b");
        assert_eq!(endpoint_from(None, Some("")), DEFAULT_ENDPOINT);
        assert_eq!(endpoint_from(None, None), DEFAULT_ENDPOINT);
    }

    #[test]
    fn http_parsing() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more";
        assert_eq!(parse_response(r), Some((200, "hello".into())));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Some((200, "abcde".into())));
        let r = b"HTTP/1.0 404 Not Found\r\n\r\n";
        assert_eq!(parse_response(r), Some((404, String::new())));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(parse_response(b"SIP/2.0 200 OK\r\n\r\n"), None);
    }

    #[test]
    fn response_completeness() {
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"
        ));
        assert!(response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        ));
        assert!(response_complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        ));
        assert!(!response_complete(b"HTTP/1.1 200 OK\r\n\r\nuntil close"));
    }

    #[test]
    fn keep_alive_server_does_not_stall_the_client() {
        // A server that answers and keeps the connection open.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let body = if held.is_empty() { "tok" } else { "" };
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
                    body.len()
                );
                held.push(conn);
            }
            held
        });
        let imds = Imds::new(&url).expect("endpoint");
        let start = std::time::Instant::now();
        let (hit, seen) = imds.find(2, 0).expect("answers");
        assert!(
            start.elapsed() < TIMEOUT,
            "did not wait for the server to close"
        );
        assert_eq!((hit, seen.len()), (None, 0));
        drop(server.join());
    }

    #[test]
    fn mac_list() {
        assert_eq!(
            parse_mac_list("02:00:00:00:00:01/\n02:AA:00:00:00:02/\n\n"),
            vec!["02:00:00:00:00:01", "02:aa:00:00:00:02"]
        );
    }

    #[test]
    fn finds_eni_through_a_loopback_fake() {
        let fake = FakeImds::start(
            "127.0.0.1:0",
            &[
                ("02:00:00:00:00:01", 0, Some(0)),
                ("02:00:00:00:00:07", 2, None),
                ("02:00:00:00:00:09", 2, Some(1)),
            ],
        );
        let imds = Imds::new(&fake.url()).expect("endpoint");
        let (hit, _) = imds.find(2, 0).expect("imds");
        assert_eq!(
            hit,
            Some(ImdsEni {
                mac: "02:00:00:00:00:07".into(),
                device_number: 2,
                network_card_index: 0
            })
        );
        let (hit, _) = imds.find(2, 1).expect("imds");
        assert_eq!(hit.map(|e| e.mac), Some("02:00:00:00:00:09".into()));
        let (hit, seen) = imds.find(5, 0).expect("imds");
        assert_eq!(hit, None);
        assert_eq!(seen.len(), 3);
        assert!(
            fake.requests_without_token() == 0,
            "IMDSv2 token always sent"
        );
    }

    #[test]
    fn unreachable_imds_is_an_io_error() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let imds = Imds::new(&format!("http://127.0.0.1:{port}")).expect("endpoint");
        let e = imds.find(2, 0).expect_err("nothing listens");
        assert!(matches!(e, ImdsError::Io { .. }), "{e}");
    }
}
