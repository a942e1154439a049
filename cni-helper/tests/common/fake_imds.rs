//! A tiny fake IMDSv2 for tests: serves the token and the per-MAC network metadata on a
//! loopback listener the test chooses. Shared by the unit tests (through `#[path]`) and the
//! integration tests. It never talks to anything but its own listener.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const TOKEN: &str = "fake-imds-token";
const MACS: &str = "/latest/meta-data/network/interfaces/macs/";

/// One ENI: MAC, device number, network card index (None: the key is absent, as on
/// instances with a single network card).
pub type FakeEni = (&'static str, u64, Option<u64>);

/// A running fake; its thread serves until the test process exits.
#[derive(Debug)]
pub struct FakeImds {
    addr: std::net::SocketAddr,
    no_token: Arc<AtomicUsize>,
}

impl FakeImds {
    /// Binds `bind` (e.g. `127.0.0.1:0`) and serves `enis`.
    pub fn start(bind: &str, enis: &[FakeEni]) -> Self {
        let listener = TcpListener::bind(bind).expect("bind fake IMDS");
        Self::serve(listener, enis)
    }

    /// Serves on an already bound listener (e.g. one bound inside another netns).
    pub fn serve(listener: TcpListener, enis: &[FakeEni]) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let enis: Vec<FakeEni> = enis.to_vec();
        let no_token = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&no_token);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                handle(conn, &enis, &counter);
            }
        });
        Self { addr, no_token }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many metadata GETs arrived without the IMDSv2 token.
    pub fn requests_without_token(&self) -> usize {
        self.no_token.load(Ordering::SeqCst)
    }
}

fn handle(conn: TcpStream, enis: &[FakeEni], no_token: &AtomicUsize) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");

    let (status, body) = if method == "PUT" && path == "/latest/api/token" {
        if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() {
            (200, TOKEN.to_owned())
        } else {
            (400, String::new())
        }
    } else if method != "GET" {
        (405, String::new())
    } else if header("x-aws-ec2-metadata-token") != Some(TOKEN) {
        no_token.fetch_add(1, Ordering::SeqCst);
        (401, String::new())
    } else if path == MACS {
        (
            200,
            enis.iter().map(|(m, _, _)| format!("{m}/\n")).collect(),
        )
    } else if let Some(rest) = path.strip_prefix(MACS) {
        let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
        match enis.iter().find(|(m, _, _)| *m == mac) {
            Some((_, dev, card)) => match key {
                "device-number" => (200, dev.to_string()),
                "network-card-index" => match card {
                    Some(c) => (200, c.to_string()),
                    None => (404, String::new()),
                },
                "mac" => (200, mac.to_owned()),
                _ => (404, String::new()),
            },
            None => (404, String::new()),
        }
    } else {
        (404, String::new())
    };
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
