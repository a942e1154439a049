//! EC2 fault layer: an HTTP proxy on loopback in front of moto's EC2 server that adds the
//! real-EC2 behaviour moto lacks (REFERENCE §2, §6).
//!
//! * per-action token buckets (`RequestLimitExceeded`, HTTP 503, not forwarded);
//! * uniform random latency;
//! * `InvalidParameterValue` for an occupied device index, `AttachmentLimitExceeded` from
//!   the instance type's limits (moto's `DescribeInstanceTypes`, cached);
//! * `InvalidNetworkInterface.InUse` when deleting an attached ENI;
//! * `ClientToken` idempotency of `CreateNetworkInterface`;
//! * sticky `Attachment.DeleteOnTermination` (rewritten into describe responses);
//! * optional `attaching` / `detaching` windows, and hung detaches that only a forced
//!   detach ends;
//! * `AssignPrivateIpAddresses` / `UnassignPrivateIpAddresses` as EC2 does them: /28
//!   prefixes (Nitro only), the instance type's `Ipv4AddressesPerInterface`, reserved
//!   subnet addresses never handed out, answers listing only what was assigned (rules in
//!   [`ipam`]);
//! * injected 5xx (`error_rate`) and per-action [`FailureRule`]s;
//! * counters ([`Stats`], also per ENI) and run-time control over HTTP:
//!   `GET /_faults/stats`, `GET|POST /_faults/config` (JSON merge patch of
//!   [`FaultConfig`]), `POST /_faults/reset`.
//!
//! Checks that need moto's state (attachments of an instance, an ENI's attachment) ask
//! moto directly before forwarding, holding a per-instance / per-ENI lock so concurrent
//! attaches to one instance are checked one at a time. These side queries are not
//! throttled or counted.

pub mod bucket;
pub mod config;
pub mod describe;
pub mod ipam;
mod stats;
pub mod xml;

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::task::JoinHandle;

pub use config::{BucketSpec, FailureRule, FaultConfig, LatencyConfig, ThrottleConfig};
pub use stats::{ActionStats, ClientStats, Outcome, Stats};

use bucket::Buckets;
use xml::{Edits, Element};

/// Errors starting the fault layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream is not an `http://` URL on a loopback address.
    #[error(
        "upstream {0:?} refused: only http:// on a loopback address (127.0.0.0/8, ::1, localhost)"
    )]
    NonLoopbackUpstream(String),
    /// The listen address is not a loopback address.
    #[error("listen address {0} refused: loopback only")]
    NonLoopbackListen(SocketAddr),
    /// Binding the listener failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fault proxy. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: the EC2 endpoint to give the SDK.
    pub endpoint: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts the proxy on a free `127.0.0.1` port in front of `upstream`
    /// (e.g. [`crate::Moto::endpoint`]).
    pub async fn start(upstream: &str, config: FaultConfig) -> Result<Self, Error> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream, config).await
    }

    /// Starts the proxy on `listen` (a loopback address; port 0 picks a free one).
    pub async fn start_on(
        listen: SocketAddr,
        upstream: &str,
        config: FaultConfig,
    ) -> Result<Self, Error> {
        if !listen.ip().is_loopback() {
            return Err(Error::NonLoopbackListen(listen));
        }
        let upstream = loopback_upstream(upstream)?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| Error::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build(connector);
        let shared = Arc::new(Shared {
            upstream,
            client,
            config: Mutex::new(config.normalized()),
            buckets: Mutex::default(),
            stats: Mutex::default(),
            state: Mutex::default(),
            locks: KeyedLocks::default(),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        tracing::info!(%addr, upstream = %shared.upstream, "ec2 fault proxy listening");
        Ok(Self {
            endpoint: format!("http://{addr}"),
            addr,
            shared,
            task,
        })
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// The current settings (rules show their remaining `times`).
    pub fn config(&self) -> FaultConfig {
        lock(&self.shared.config).clone()
    }

    /// Replaces the settings. Token buckets restart full when the throttle settings change.
    pub fn set_config(&self, config: FaultConfig) {
        self.shared.set_config(config);
    }

    /// Changes some settings in place.
    pub fn update_config(&self, f: impl FnOnce(&mut FaultConfig)) {
        let mut config = self.config();
        f(&mut config);
        self.set_config(config);
    }

    /// Zeroes the counters, refills the buckets and forgets remembered EC2 state (client
    /// tokens, DeleteOnTermination, attaching/detaching windows, cached limits). Keeps
    /// the settings.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

fn loopback_upstream(upstream: &str) -> Result<Uri, Error> {
    let refuse = || Error::NonLoopbackUpstream(upstream.to_string());
    let uri: Uri = upstream.parse().map_err(|_| refuse())?;
    if uri.scheme_str() != Some("http") {
        return Err(refuse());
    }
    let host = uri.host().ok_or_else(refuse)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(refuse());
    }
    let authority = uri.authority().ok_or_else(refuse)?.clone();
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|_| refuse())
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connections live in the set, so aborting this task closes them all.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(error = %e, "connection");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Per-key async locks (instance, ENI, client token).
#[derive(Debug, Default)]
struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.0).entry(key).or_default().clone();
        m.lock_owned().await
    }
}

/// A remembered `CreateNetworkInterface` answer.
#[derive(Debug, Clone)]
struct TokenEntry {
    fingerprint: Vec<(String, String)>,
    status: StatusCode,
    body: Bytes,
}

/// An attachment reported as `detaching` after moto dropped it.
#[derive(Debug, Clone)]
struct Detaching {
    attachment_id: String,
    instance_id: String,
    device_index: String,
    network_card_index: String,
    /// The `<attachment>` element to splice back into describes.
    xml: String,
    until: Instant,
}

/// Per-type limits from `DescribeInstanceTypes`.
#[derive(Debug, Clone)]
struct Limits {
    max_interfaces: u64,
    /// network card index -> max interfaces on it.
    cards: HashMap<String, u64>,
    /// `Ipv4AddressesPerInterface` (primary, secondary addresses and prefixes count one each).
    ipv4_per_interface: Option<u64>,
    /// `hypervisor` is `nitro`: /28 prefixes are allowed.
    nitro: bool,
}

/// An ENI's addresses as moto lists them.
#[derive(Debug)]
struct EniAddresses {
    subnet: String,
    primary: u32,
    /// Secondary addresses (the primary excluded).
    secondary: BTreeSet<u32>,
    /// The instance it is attached to.
    instance: Option<String>,
}

/// The /28 prefixes the fault layer assigned to one ENI (moto has none).
#[derive(Debug, Clone, Default)]
struct EniPrefixes {
    subnet: String,
    prefixes: Vec<ipam::Cidr>,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, TokenEntry>,
    /// attachment id -> DeleteOnTermination.
    delete_on_termination: HashMap<String, bool>,
    /// attachment id -> end of its `attaching` window.
    attaching: HashMap<String, Instant>,
    /// ENI id -> its `detaching` attachment.
    detaching: HashMap<String, Detaching>,
    instance_types: HashMap<String, String>,
    limits: HashMap<String, Limits>,
    /// attachment id -> ENI, learned from successful attaches (a detach names only the
    /// attachment; per-ENI counters need the ENI).
    attachment_owner: HashMap<String, String>,
    /// ENI id -> its prefixes.
    prefixes: HashMap<String, EniPrefixes>,
}

impl State {
    fn expire(&mut self, now: Instant) {
        self.attaching.retain(|_, until| *until > now);
        self.detaching.retain(|_, d| d.until > now);
    }
}

#[derive(Debug)]
struct Shared {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    config: Mutex<FaultConfig>,
    buckets: Mutex<Buckets>,
    stats: Mutex<Stats>,
    state: Mutex<State>,
    locks: KeyedLocks,
}

/// A response from moto.
#[derive(Debug)]
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// An EC2 error answered by the proxy itself.
#[derive(Debug)]
struct Ec2Error {
    status: StatusCode,
    code: String,
    message: String,
}

impl Ec2Error {
    fn bad_request(code: &str, message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: code.into(),
            message,
        }
    }
}

/// Form parameters of a query-protocol request.
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses the URL query and a form-encoded body.
    pub fn parse(query: Option<&str>, body: &[u8]) -> Self {
        let mut v: Vec<(String, String)> = query
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        v.extend(form_urlencoded::parse(body).into_owned());
        Self(v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// All parameters but `ClientToken`, sorted: what must match for an idempotent retry.
    fn fingerprint(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| k != "ClientToken")
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// The access key ID of a SigV4 `Authorization` header (`... Credential=AKID/date/...`).
fn access_key_id(auth: &HeaderValue) -> Option<String> {
    let text = auth.to_str().ok()?;
    let cred = text.split("Credential=").nth(1)?;
    let id = cred.split('/').next()?;
    (!id.is_empty()).then(|| id.to_string())
}

fn request_id() -> String {
    let n: u128 = rand::rng().random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn error_response(e: &Ec2Error) -> Response<Full<Bytes>> {
    let body = xml::error_document(&e.code, &e.message, &request_id());
    Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn text_response(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

fn upstream_response(up: Upstream, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = up.status;
    for (k, v) in &up.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            resp.headers_mut().append(k.clone(), v.clone());
        }
    }
    resp
}

impl Shared {
    fn set_config(&self, config: FaultConfig) {
        let config = config.normalized();
        let mut current = lock(&self.config);
        if current.throttle != config.throttle {
            lock(&self.buckets).clear();
        }
        *current = config;
    }

    fn reset(&self) {
        *lock(&self.stats) = Stats::default();
        lock(&self.buckets).clear();
        *lock(&self.state) = State::default();
    }

    fn record(&self, action: &str, outcome: Outcome, code: Option<&str>) {
        lock(&self.stats).record(action, outcome, code);
    }

    /// The ENI a mutating request is about, if the request names it (or names an
    /// attachment the proxy saw being made). `CreateNetworkInterface` is counted under
    /// `token:<ClientToken>` until it succeeds, then under the new ENI.
    fn eni_of(&self, action: &str, params: &Params) -> Option<String> {
        if bucket::is_describe(action) {
            return None;
        }
        if let Some(eni) = params.get("NetworkInterfaceId") {
            return Some(eni.to_string());
        }
        if let Some(att) = params.get("AttachmentId") {
            return Some(
                lock(&self.state)
                    .attachment_owner
                    .get(att)
                    .cloned()
                    .unwrap_or_else(|| format!("attachment:{att}")),
            );
        }
        if action == "CreateNetworkInterface" {
            return Some(format!(
                "token:{}",
                params.get("ClientToken").unwrap_or_default()
            ));
        }
        None
    }

    fn record_eni(&self, eni: Option<&str>, outcome: Outcome, code: Option<&str>) {
        if let Some(eni) = eni {
            lock(&self.stats).record_eni(eni, outcome, code);
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("read body: {e}")),
        };
        if parts.uri.path().starts_with("/_faults") {
            return self.control(&parts.method, parts.uri.path(), &body);
        }
        let params = Params::parse(parts.uri.query(), &body);
        let Some(action) = params.get("Action").map(str::to_string) else {
            // Not an EC2 query-protocol call: pass it through untouched.
            return match self.forward(&parts, body).await {
                Ok(up) => {
                    let body = up.body.clone();
                    upstream_response(up, body)
                }
                Err(e) => error_response(&e),
            };
        };
        let auth = parts.headers.get(header::AUTHORIZATION).cloned();
        let config = lock(&self.config).clone();
        let mut eni = self.eni_of(&action, &params);
        if let Some(client) = auth.as_ref().and_then(access_key_id) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            lock(&self.stats).record_client(&client, &action, now);
        }

        if config.latency.max_ms > 0 {
            let ms = rand::rng().random_range(config.latency.min_ms..=config.latency.max_ms);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }

        // Throttling.
        let allowed = lock(&self.buckets).try_take(&config.throttle, &action, Instant::now());
        if !allowed {
            let e = Ec2Error {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "RequestLimitExceeded".into(),
                message: "Request limit exceeded.".into(),
            };
            self.record(&action, Outcome::Throttled, Some(&e.code));
            self.record_eni(eni.as_deref(), Outcome::Throttled, Some(&e.code));
            return error_response(&e);
        }

        // Injection.
        let (before, after) = self.take_rules(&action);
        if let Some(e) = before {
            self.record(&action, Outcome::Injected, Some(&e.code));
            self.record_eni(eni.as_deref(), Outcome::Injected, Some(&e.code));
            return error_response(&e);
        }
        if config.error_rate > 0.0 && rand::rng().random_bool(config.error_rate) {
            let e = Ec2Error {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "InternalError".into(),
                message: "An internal error has occurred (injected by ec2-faults)".into(),
            };
            self.record(&action, Outcome::Injected, Some(&e.code));
            self.record_eni(eni.as_deref(), Outcome::Injected, Some(&e.code));
            return error_response(&e);
        }

        // DescribeNetworkInterfaces: filters moto lacks and pagination.
        let mut body = body;
        let mut plan = None;
        if action == "DescribeNetworkInterfaces" && parts.uri.query().is_none() {
            match describe::plan(
                &params,
                config.emulate_describe_filters,
                config.paginate_describes,
            ) {
                Ok((p, Some(forwarded))) => {
                    body = Bytes::from(
                        form_urlencoded::Serializer::new(String::new())
                            .extend_pairs(forwarded)
                            .finish(),
                    );
                    plan = Some(p);
                }
                Ok((_, None)) => {}
                Err(e) => {
                    let e = Ec2Error::bad_request("InvalidParameterValue", e.to_string());
                    self.record(&action, Outcome::Rejected, Some(&e.code));
                    return error_response(&e);
                }
            }
        }

        let ctx = Call {
            shared: &self,
            parts: &parts,
            body,
            params: &params,
            auth: auth.as_ref(),
            config: &config,
            action: &action,
        };
        let result = match action.as_str() {
            "AttachNetworkInterface" => ctx.attach().await,
            "DetachNetworkInterface" => ctx.detach().await,
            "DeleteNetworkInterface" => ctx.delete().await,
            "CreateNetworkInterface" => ctx.create().await,
            "ModifyNetworkInterfaceAttribute" => ctx.modify().await,
            "AssignPrivateIpAddresses" if config.emulate_ip_assignment => ctx.assign().await,
            "UnassignPrivateIpAddresses" if config.emulate_ip_assignment => ctx.unassign().await,
            _ => ctx.plain().await,
        };
        match result {
            Ok(Answer::Upstream(up)) => {
                if action == "CreateNetworkInterface"
                    && up.status.is_success()
                    && let Some(id) = std::str::from_utf8(&up.body)
                        .ok()
                        .and_then(|t| xml::parse(t).ok())
                        .and_then(|r| r.find_text("networkInterfaceId").map(str::to_string))
                {
                    eni = Some(id);
                }
                if let Some(e) = after {
                    self.record(&action, Outcome::Injected, Some(&e.code));
                    self.record_eni(eni.as_deref(), Outcome::Injected, Some(&e.code));
                    return error_response(&e);
                }
                let outcome = if up.status.is_success() {
                    (Outcome::Forwarded, None)
                } else {
                    let code = std::str::from_utf8(&up.body)
                        .ok()
                        .and_then(xml::error_code)
                        .unwrap_or_else(|| format!("HTTP{}", up.status.as_u16()));
                    (Outcome::UpstreamError, Some(code))
                };
                let mut body = if up.status.is_success() {
                    self.rewrite(&action, &up.body)
                } else {
                    up.body.clone()
                };
                if let Some(plan) = plan.as_ref().filter(|_| up.status.is_success()) {
                    match std::str::from_utf8(&body).map(|t| describe::apply(t, plan)) {
                        Ok(Ok(t)) => body = Bytes::from(t),
                        Ok(Err(e)) => tracing::warn!(error = %e, "describe emulation"),
                        Err(e) => tracing::warn!(error = %e, "describe emulation"),
                    }
                }
                self.record(&action, outcome.0, outcome.1.as_deref());
                self.record_eni(eni.as_deref(), outcome.0, outcome.1.as_deref());
                upstream_response(up, body)
            }
            Ok(Answer::Replay(status, body)) => {
                self.record(&action, Outcome::Replayed, None);
                self.record_eni(eni.as_deref(), Outcome::Replayed, None);
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = status;
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
                resp
            }
            Err(Reject::Ec2(e)) => {
                self.record(&action, Outcome::Rejected, Some(&e.code));
                self.record_eni(eni.as_deref(), Outcome::Rejected, Some(&e.code));
                error_response(&e)
            }
            Err(Reject::Unreachable(e)) => {
                self.record(&action, Outcome::UpstreamError, Some(&e.code));
                self.record_eni(eni.as_deref(), Outcome::UpstreamError, Some(&e.code));
                error_response(&e)
            }
        }
    }

    /// The first matching rule before and after forwarding; spends their `times`.
    fn take_rules(&self, action: &str) -> (Option<Ec2Error>, Option<Ec2Error>) {
        let mut config = lock(&self.config);
        let mut before = None;
        let mut after = None;
        for rule in config.rules.iter_mut() {
            let slot = if rule.after_forward {
                &mut after
            } else {
                &mut before
            };
            if slot.is_some() || !rule.matches(action) || rule.times == Some(0) {
                continue;
            }
            if rule.probability < 1.0 && !rand::rng().random_bool(rule.probability) {
                continue;
            }
            if let Some(t) = rule.times.as_mut() {
                *t -= 1;
            }
            *slot = Some(Ec2Error {
                status: StatusCode::from_u16(rule.status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                code: rule.code.clone(),
                message: rule.message.clone(),
            });
        }
        (before, after)
    }

    fn control(&self, method: &Method, path: &str, body: &[u8]) -> Response<Full<Bytes>> {
        match (method.as_str(), path.trim_end_matches('/')) {
            ("GET", "/_faults/stats") => json_response(StatusCode::OK, &*lock(&self.stats)),
            ("GET", "/_faults/config") => json_response(StatusCode::OK, &*lock(&self.config)),
            ("POST", "/_faults/config") => {
                let patch: serde_json::Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => {
                        return text_response(StatusCode::BAD_REQUEST, format!("bad JSON: {e}"));
                    }
                };
                let current = lock(&self.config).clone();
                let mut value = match serde_json::to_value(&current) {
                    Ok(v) => v,
                    Err(e) => {
                        return text_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                    }
                };
                config::merge_patch(&mut value, &patch);
                match serde_json::from_value::<FaultConfig>(value) {
                    Ok(c) => {
                        self.set_config(c);
                        tracing::info!(patch = %patch, "fault config changed");
                        json_response(StatusCode::OK, &*lock(&self.config))
                    }
                    Err(e) => text_response(StatusCode::BAD_REQUEST, format!("bad config: {e}")),
                }
            }
            ("POST", "/_faults/reset") => {
                self.reset();
                json_response(StatusCode::OK, &serde_json::json!({}))
            }
            _ => text_response(
                StatusCode::NOT_FOUND,
                "GET /_faults/stats, GET|POST /_faults/config, POST /_faults/reset\n".into(),
            ),
        }
    }

    /// Forwards the client's request to moto unchanged.
    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Upstream, Ec2Error> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = self.uri(path)?;
        for (k, v) in &parts.headers {
            if !HOP_BY_HOP.contains(&k.as_str()) {
                req.headers_mut().append(k.clone(), v.clone());
            }
        }
        self.send(req).await
    }

    /// A query of our own to moto (not throttled, not counted). `auth` carries the
    /// caller's region/account (moto reads them from the credential scope).
    async fn query(
        &self,
        auth: Option<&HeaderValue>,
        params: &[(&str, &str)],
    ) -> Result<Element, Ec2Error> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter().copied())
            .append_pair("Version", "2016-11-15")
            .finish();
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri("/")?;
        req.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        if let Some(auth) = auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        let up = self.send(req).await?;
        let text = String::from_utf8_lossy(&up.body);
        if !up.status.is_success() {
            return Err(Ec2Error {
                status: up.status,
                code: xml::error_code(&text).unwrap_or_else(|| "UpstreamError".into()),
                message: format!("side query {params:?}: HTTP {}", up.status),
            });
        }
        xml::parse(&text).map_err(|e| Ec2Error {
            status: StatusCode::BAD_GATEWAY,
            code: "InternalError".into(),
            message: format!("side query {params:?}: {e}"),
        })
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, Ec2Error> {
        let authority = self
            .upstream
            .authority()
            .map(|a| a.as_str())
            .unwrap_or("127.0.0.1");
        format!("http://{authority}{path_and_query}")
            .parse()
            .map_err(|e| Ec2Error {
                status: StatusCode::BAD_REQUEST,
                code: "InvalidParameterValue".into(),
                message: format!("bad path: {e}"),
            })
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Upstream, Ec2Error> {
        let unreachable = |what: String| Ec2Error {
            status: StatusCode::BAD_GATEWAY,
            code: "InternalError".into(),
            message: format!("ec2-faults: upstream {}: {what}", self.upstream),
        };
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok(Upstream {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Applies remembered state to a successful response (DeleteOnTermination,
    /// attaching/detaching windows).
    fn rewrite(&self, action: &str, body: &Bytes) -> Bytes {
        if !(action == "DescribeNetworkInterfaces" || action == "DescribeInstances") {
            return body.clone();
        }
        let now = Instant::now();
        let mut state = lock(&self.state);
        state.expire(now);
        if state.delete_on_termination.is_empty()
            && state.attaching.is_empty()
            && state.detaching.is_empty()
            && state.prefixes.is_empty()
        {
            return body.clone();
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return body.clone();
        };
        let Ok(root) = xml::parse(text) else {
            return body.clone();
        };
        let mut edits = Edits::default();
        for att in root.find_all("attachment") {
            patch_attachment(att, &state, &mut edits);
        }
        if action == "DescribeNetworkInterfaces" {
            for set in root.find_all("networkInterfaceSet") {
                for item in &set.children {
                    if let Some(p) = item
                        .child_text("networkInterfaceId")
                        .and_then(|id| state.prefixes.get(id))
                        .filter(|p| !p.prefixes.is_empty())
                        && item.child("ipv4PrefixSet").is_none()
                    {
                        edits.insert(item.inner.end, ipam::prefix_set_xml(&p.prefixes));
                    }
                    let Some(d) = item
                        .child_text("networkInterfaceId")
                        .and_then(|id| state.detaching.get(id))
                    else {
                        continue;
                    };
                    if item.child("attachment").is_some() {
                        continue;
                    }
                    edits.insert(item.inner.start, d.xml.clone());
                    if let Some(status) = item.child("status") {
                        edits.replace(status.inner.clone(), "in-use");
                    }
                }
            }
        }
        if edits.is_empty() {
            return body.clone();
        }
        Bytes::from(edits.apply(text))
    }
}

/// DeleteOnTermination and `attaching` for one `<attachment>` element.
fn patch_attachment(att: &Element, state: &State, edits: &mut Edits) {
    let Some(id) = att.child_text("attachmentId") else {
        return;
    };
    if let Some(dot) = state.delete_on_termination.get(id) {
        match att.child("deleteOnTermination") {
            Some(el) => edits.replace(el.inner.clone(), dot.to_string()),
            None => edits.insert(
                att.inner.end,
                format!("<deleteOnTermination>{dot}</deleteOnTermination>"),
            ),
        }
    }
    if state.attaching.contains_key(id)
        && let Some(status) = att.child("status")
    {
        edits.replace(status.inner.clone(), "attaching");
    }
}

enum Answer {
    Upstream(Upstream),
    Replay(StatusCode, Bytes),
}

enum Reject {
    /// An emulated EC2 error.
    Ec2(Ec2Error),
    /// moto could not be reached.
    Unreachable(Ec2Error),
}

/// One EC2 call being handled.
struct Call<'a> {
    shared: &'a Shared,
    parts: &'a http::request::Parts,
    body: Bytes,
    params: &'a Params,
    auth: Option<&'a HeaderValue>,
    config: &'a FaultConfig,
    action: &'a str,
}

/// An attachment as moto reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentInfo {
    /// The ENI.
    pub network_interface_id: String,
    /// `eni-attach-...`.
    pub attachment_id: String,
    /// The instance.
    pub instance_id: String,
    /// Device index.
    pub device_index: String,
    /// Network card index (`0` when absent).
    pub network_card_index: String,
    /// `attached`, `attaching`, ...
    pub status: String,
}

/// Attachments in a `DescribeNetworkInterfaces` response.
pub fn attachments(root: &Element) -> Vec<AttachmentInfo> {
    let mut out = Vec::new();
    for set in root.find_all("networkInterfaceSet") {
        for item in &set.children {
            let Some(att) = item.child("attachment") else {
                continue;
            };
            let text = |e: &Element, n: &str| e.child_text(n).unwrap_or_default().to_string();
            out.push(AttachmentInfo {
                network_interface_id: text(item, "networkInterfaceId"),
                attachment_id: text(att, "attachmentId"),
                instance_id: text(att, "instanceId"),
                device_index: text(att, "deviceIndex"),
                network_card_index: att
                    .child_text("networkCardIndex")
                    .filter(|s| !s.is_empty())
                    .unwrap_or("0")
                    .to_string(),
                status: text(att, "status"),
            });
        }
    }
    out
}

impl Call<'_> {
    async fn plain(&self) -> Result<Answer, Reject> {
        self.shared
            .forward(self.parts, self.body.clone())
            .await
            .map(Answer::Upstream)
            .map_err(Reject::Unreachable)
    }

    async fn attach(&self) -> Result<Answer, Reject> {
        let (Some(instance), Some(eni)) = (
            self.params.get("InstanceId"),
            self.params.get("NetworkInterfaceId"),
        ) else {
            return self.plain().await;
        };
        let checks =
            self.config.reject_duplicate_device_index || self.config.enforce_attachment_limits;
        let _guards = if checks {
            let a = self.shared.locks.lock(format!("instance/{instance}")).await;
            let b = self.shared.locks.lock(format!("eni/{eni}")).await;
            match self.check_attach(instance).await {
                Ok(()) => {}
                Err(Reject::Ec2(e)) => return Err(Reject::Ec2(e)),
                Err(Reject::Unreachable(e)) => {
                    // moto could not tell us (unknown instance, ...): let it answer.
                    tracing::debug!(code = %e.code, message = %e.message, "attach check skipped");
                }
            }
            Some((a, b))
        } else {
            None
        };
        let answer = self.plain().await?;
        if let Answer::Upstream(up) = &answer
            && up.status.is_success()
            && let Some(id) = std::str::from_utf8(&up.body)
                .ok()
                .and_then(|t| xml::parse(t).ok())
                .and_then(|r| r.find_text("attachmentId").map(str::to_string))
        {
            let mut state = lock(&self.shared.state);
            state.attachment_owner.insert(id.clone(), eni.to_string());
            if self.config.attach_delay_ms > 0 {
                let until = Instant::now() + Duration::from_millis(self.config.attach_delay_ms);
                state.attaching.insert(id, until);
            }
        }
        Ok(answer)
    }

    /// `Ok` to forward; `Err(Reject::Ec2)` with HTTP 400 to refuse; other errors mean the
    /// state could not be read.
    async fn check_attach(&self, instance: &str) -> Result<(), Reject> {
        let device_index = self.params.get("DeviceIndex").unwrap_or_default().trim();
        let card = self
            .params
            .get("NetworkCardIndex")
            .unwrap_or("0")
            .trim()
            .to_string();
        let root = self
            .shared
            .query(
                self.auth,
                &[
                    ("Action", "DescribeNetworkInterfaces"),
                    ("Filter.1.Name", "attachment.instance-id"),
                    ("Filter.1.Value.1", instance),
                ],
            )
            .await
            .map_err(Reject::Unreachable)?;
        let mut slots: Vec<(String, String)> = attachments(&root)
            .into_iter()
            .filter(|a| a.instance_id == instance && a.status != "detached")
            .map(|a| (a.device_index, a.network_card_index))
            .collect();
        {
            let mut state = lock(&self.shared.state);
            state.expire(Instant::now());
            slots.extend(
                state
                    .detaching
                    .values()
                    .filter(|d| d.instance_id == instance)
                    .map(|d| (d.device_index.clone(), d.network_card_index.clone())),
            );
        }
        if self.config.reject_duplicate_device_index
            && slots.iter().any(|(d, c)| d == device_index && *c == card)
        {
            return Err(Reject::Ec2(Ec2Error::bad_request(
                "InvalidParameterValue",
                format!(
                    "Instance '{instance}' already has an interface attached at device index '{device_index}'."
                ),
            )));
        }
        if self.config.enforce_attachment_limits {
            let (instance_type, limits) = self.limits(instance).await?;
            let total = slots.len() as u64;
            let on_card = slots.iter().filter(|(_, c)| *c == card).count() as u64;
            let card_max = limits.cards.get(&card).copied();
            if total >= limits.max_interfaces || card_max.is_some_and(|m| on_card >= m) {
                return Err(Reject::Ec2(Ec2Error::bad_request(
                    "AttachmentLimitExceeded",
                    format!(
                        "Interface count {} exceeds the limit for {instance_type}",
                        total + 1
                    ),
                )));
            }
        }
        Ok(())
    }

    /// The instance's type and its limits (cached).
    async fn limits(&self, instance: &str) -> Result<(String, Limits), Reject> {
        let cached_type = lock(&self.shared.state)
            .instance_types
            .get(instance)
            .cloned();
        let instance_type = match cached_type {
            Some(t) => t,
            None => {
                let root = self
                    .shared
                    .query(
                        self.auth,
                        &[("Action", "DescribeInstances"), ("InstanceId.1", instance)],
                    )
                    .await
                    .map_err(Reject::Unreachable)?;
                let t = root
                    .find_text("instanceType")
                    .map(str::to_string)
                    .ok_or_else(|| {
                        Reject::Unreachable(Ec2Error::bad_request(
                            "InternalError",
                            format!("no instanceType for {instance}"),
                        ))
                    })?;
                lock(&self.shared.state)
                    .instance_types
                    .insert(instance.to_string(), t.clone());
                t
            }
        };
        if let Some(l) = lock(&self.shared.state).limits.get(&instance_type).cloned() {
            return Ok((instance_type, l));
        }
        let root = self
            .shared
            .query(
                self.auth,
                &[
                    ("Action", "DescribeInstanceTypes"),
                    ("InstanceType.1", &instance_type),
                ],
            )
            .await
            .map_err(Reject::Unreachable)?;
        let limits = parse_limits(&root).ok_or_else(|| {
            Reject::Unreachable(Ec2Error::bad_request(
                "InternalError",
                format!("no network info for {instance_type}"),
            ))
        })?;
        lock(&self.shared.state)
            .limits
            .insert(instance_type.clone(), limits.clone());
        Ok((instance_type, limits))
    }

    async fn detach(&self) -> Result<Answer, Reject> {
        let Some(attachment_id) = self.params.get("AttachmentId") else {
            return self.plain().await;
        };
        let forced = self.params.get("Force") == Some("true");
        if forced {
            // A forced detach ends a hung (or slow) detach at once. moto dropped the
            // attachment already; answer for it.
            let mut state = lock(&self.shared.state);
            let before = state.detaching.len();
            state
                .detaching
                .retain(|_, d| d.attachment_id != attachment_id);
            if state.detaching.len() != before {
                return Ok(Answer::Replay(
                    StatusCode::OK,
                    Bytes::from_static(
                        b"<DetachNetworkInterfaceResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>fault-layer</requestId><return>true</return></DetachNetworkInterfaceResponse>",
                    ),
                ));
            }
        }
        let hang = self.config.hang_detaches && !forced;
        let mut captured = None;
        if (self.config.detach_delay_ms > 0 || hang)
            && let Ok(root) = self
                .shared
                .query(
                    self.auth,
                    &[
                        ("Action", "DescribeNetworkInterfaces"),
                        ("Filter.1.Name", "attachment.attachment-id"),
                        ("Filter.1.Value.1", attachment_id),
                    ],
                )
                .await
        {
            captured = capture_detaching(&root, attachment_id, &lock(&self.shared.state));
        }
        let answer = self.plain().await?;
        if let Answer::Upstream(up) = &answer
            && up.status.is_success()
        {
            let mut state = lock(&self.shared.state);
            state.delete_on_termination.remove(attachment_id);
            state.attaching.remove(attachment_id);
            if let Some((eni, mut d)) = captured {
                let window = if hang {
                    // Hung: only a forced detach ends it.
                    Duration::from_secs(24 * 3600)
                } else {
                    Duration::from_millis(self.config.detach_delay_ms)
                };
                d.until = Instant::now() + window;
                state.detaching.insert(eni, d);
            }
        }
        Ok(answer)
    }

    async fn delete(&self) -> Result<Answer, Reject> {
        let Some(eni) = self.params.get("NetworkInterfaceId") else {
            return self.plain().await;
        };
        let _guard = if self.config.reject_in_use_delete {
            let guard = self.shared.locks.lock(format!("eni/{eni}")).await;
            let detaching = {
                let mut state = lock(&self.shared.state);
                state.expire(Instant::now());
                state.detaching.contains_key(eni)
            };
            let attached = match self
                .shared
                .query(
                    self.auth,
                    &[
                        ("Action", "DescribeNetworkInterfaces"),
                        ("NetworkInterfaceId.1", eni),
                    ],
                )
                .await
            {
                Ok(root) => attachments(&root)
                    .iter()
                    .any(|a| a.network_interface_id == eni && a.status != "detached"),
                // Unknown ENI etc.: moto answers for itself.
                Err(_) => false,
            };
            if attached || detaching {
                return Err(Reject::Ec2(Ec2Error::bad_request(
                    "InvalidNetworkInterface.InUse",
                    format!("The network interface '{eni}' is currently in use."),
                )));
            }
            Some(guard)
        } else {
            None
        };
        let answer = self.plain().await?;
        if let Answer::Upstream(up) = &answer
            && up.status.is_success()
        {
            lock(&self.shared.state).prefixes.remove(eni);
        }
        Ok(answer)
    }

    async fn create(&self) -> Result<Answer, Reject> {
        let token = self.params.get("ClientToken").unwrap_or_default();
        if !self.config.client_token_idempotency || token.is_empty() {
            return self.plain().await;
        }
        let _guard = self.shared.locks.lock(format!("token/{token}")).await;
        let fingerprint = self.params.fingerprint();
        let known = lock(&self.shared.state).tokens.get(token).cloned();
        if let Some(entry) = known {
            if entry.fingerprint == fingerprint {
                return Ok(Answer::Replay(entry.status, entry.body));
            }
            return Err(Reject::Ec2(Ec2Error::bad_request(
                "IdempotentParameterMismatch",
                format!("The client token '{token}' was already used with different parameters."),
            )));
        }
        let answer = self.plain().await?;
        if let Answer::Upstream(up) = &answer
            && up.status.is_success()
        {
            lock(&self.shared.state).tokens.insert(
                token.to_string(),
                TokenEntry {
                    fingerprint,
                    status: up.status,
                    body: up.body.clone(),
                },
            );
        }
        Ok(answer)
    }

    /// What moto knows about one ENI's addresses. `Ok(None)`: moto does not know it (let
    /// moto answer).
    async fn eni_addresses(&self, eni: &str) -> Result<Option<EniAddresses>, Reject> {
        let root = match self
            .shared
            .query(
                self.auth,
                &[
                    ("Action", "DescribeNetworkInterfaces"),
                    ("NetworkInterfaceId.1", eni),
                ],
            )
            .await
        {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        for set in root.find_all("networkInterfaceSet") {
            for item in &set.children {
                if item.child_text("networkInterfaceId") != Some(eni) {
                    continue;
                }
                let subnet = item.child_text("subnetId").unwrap_or_default().to_string();
                let mut primary = item.child_text("privateIpAddress").and_then(ipam::ip);
                let mut secondary = BTreeSet::new();
                if let Some(addrs) = item.child("privateIpAddressesSet") {
                    for a in &addrs.children {
                        let Some(ip) = a.child_text("privateIpAddress").and_then(ipam::ip) else {
                            continue;
                        };
                        if a.child_text("primary") == Some("true") {
                            primary = Some(ip);
                        } else {
                            secondary.insert(ip);
                        }
                    }
                }
                if let Some(p) = primary {
                    secondary.remove(&p);
                }
                let instance = item
                    .child("attachment")
                    .filter(|a| a.child_text("status") != Some("detached"))
                    .and_then(|a| a.child_text("instanceId"))
                    .filter(|i| !i.is_empty())
                    .map(str::to_string);
                return Ok(Some(EniAddresses {
                    subnet,
                    primary: primary.unwrap_or_default(),
                    secondary,
                    instance,
                }));
            }
        }
        Ok(None)
    }

    /// The subnet's CIDR and everything taken in it (moto's addresses, our prefixes).
    async fn subnet_taken(&self, subnet: &str) -> Result<(ipam::Cidr, ipam::Taken), Reject> {
        let root = self
            .shared
            .query(
                self.auth,
                &[("Action", "DescribeSubnets"), ("SubnetId.1", subnet)],
            )
            .await
            .map_err(Reject::Unreachable)?;
        let cidr = root
            .find_text("cidrBlock")
            .and_then(ipam::Cidr::parse)
            .ok_or_else(|| {
                Reject::Unreachable(Ec2Error::bad_request(
                    "InternalError",
                    format!("no CIDR block for {subnet}"),
                ))
            })?;
        let root = self
            .shared
            .query(
                self.auth,
                &[
                    ("Action", "DescribeNetworkInterfaces"),
                    ("Filter.1.Name", "subnet-id"),
                    ("Filter.1.Value.1", subnet),
                ],
            )
            .await
            .map_err(Reject::Unreachable)?;
        let mut taken = ipam::Taken::default();
        for a in root.find_all("privateIpAddress") {
            if let Some(ip) = ipam::ip(&a.text) {
                taken.addresses.insert(ip);
            }
        }
        for p in lock(&self.shared.state).prefixes.values() {
            if p.subnet == subnet {
                taken.prefixes.extend(p.prefixes.iter().copied());
            }
        }
        Ok((cidr, taken))
    }

    /// The form body of `action` on `eni` with explicit `PrivateIpAddress.N`.
    fn address_form(
        &self,
        action: &str,
        eni: &str,
        addresses: impl Iterator<Item = String>,
    ) -> Bytes {
        let mut body = form_urlencoded::Serializer::new(String::new());
        body.append_pair("Action", action)
            .append_pair(
                "Version",
                self.params.get("Version").unwrap_or("2016-11-15"),
            )
            .append_pair("NetworkInterfaceId", eni);
        for (i, a) in addresses.enumerate() {
            body.append_pair(&format!("PrivateIpAddress.{}", i + 1), &a);
        }
        Bytes::from(body.finish())
    }

    /// `AssignPrivateIpAddresses` as real EC2 does it (rules 1-6 of [`ipam`]).
    async fn assign(&self) -> Result<Answer, Reject> {
        let Some(eni) = self.params.get("NetworkInterfaceId") else {
            return self.plain().await;
        };
        let bad = |code: &str, m: String| Err(Reject::Ec2(Ec2Error::bad_request(code, m)));
        let count_param = |name: &str| -> Result<usize, Reject> {
            match self.params.get(name) {
                None => Ok(0),
                Some(v) => v.trim().parse().map_err(|_| {
                    Reject::Ec2(Ec2Error::bad_request(
                        "InvalidParameterValue",
                        format!("Invalid value '{v}' for {name}"),
                    ))
                }),
            }
        };
        let count = count_param("SecondaryPrivateIpAddressCount")?;
        let prefix_count = count_param("Ipv4PrefixCount")?;
        let explicit = ipam::indexed(self.params, "PrivateIpAddress");
        let explicit_prefixes = ipam::indexed(self.params, "Ipv4Prefix");
        let wants_addresses = count > 0 || !explicit.is_empty();
        let wants_prefixes = prefix_count > 0 || !explicit_prefixes.is_empty();
        if wants_addresses && wants_prefixes {
            return bad(
                "InvalidParameterCombination",
                "Private IP addresses and IPv4 prefixes cannot be assigned in one request".into(),
            );
        }
        if (count > 0 && !explicit.is_empty())
            || (prefix_count > 0 && !explicit_prefixes.is_empty())
        {
            return bad(
                "InvalidParameterCombination",
                "Specify either a count or explicit values, not both".into(),
            );
        }
        let _eni_guard = self.shared.locks.lock(format!("eni/{eni}")).await;
        let Some(EniAddresses {
            subnet,
            secondary,
            instance,
            ..
        }) = self.eni_addresses(eni).await?
        else {
            return self.plain().await;
        };
        let _subnet_guard = self.shared.locks.lock(format!("subnet/{subnet}")).await;
        let (cidr, taken) = self.subnet_taken(&subnet).await?;
        let own_prefixes = lock(&self.shared.state)
            .prefixes
            .get(eni)
            .map(|p| p.prefixes.len())
            .unwrap_or(0);

        // Choose what to assign.
        let mut addresses = Vec::new();
        let mut prefixes = Vec::new();
        if count > 0 {
            addresses = match ipam::free_addresses(cidr, &taken, count) {
                Some(a) => a,
                None => {
                    return bad(
                        "InsufficientFreeAddressesInSubnet",
                        format!(
                            "The specified subnet {subnet} does not have enough free addresses to satisfy the request."
                        ),
                    );
                }
            };
        }
        for a in &explicit {
            let Some(ip) = ipam::ip(a).filter(|ip| cidr.contains(*ip)) else {
                return bad(
                    "InvalidParameterValue",
                    format!("Address {a} is not in the subnet {subnet} ({cidr})"),
                );
            };
            if cidr.is_reserved(ip) {
                return bad(
                    "InvalidParameterValue",
                    format!("Address {a} is reserved in subnet {subnet} ({cidr})"),
                );
            }
            if taken.covers(ip) || addresses.contains(&ip) {
                return bad("PrivateIpAddressInUse", format!("Address {a} is in use."));
            }
            addresses.push(ip);
        }
        if prefix_count > 0 {
            prefixes = match ipam::free_prefixes(cidr, &taken, prefix_count) {
                Some(p) => p,
                None => {
                    return bad(
                        "InsufficientCidrBlocks",
                        format!(
                            "The specified subnet {subnet} does not have enough contiguous free space for the requested prefixes."
                        ),
                    );
                }
            };
        }
        for p in &explicit_prefixes {
            let Some(c) = ipam::Cidr::parse(p).filter(|c| c.to_string() == p.trim()) else {
                return bad("InvalidParameterValue", format!("Invalid prefix {p}"));
            };
            if !ipam::prefix_is_free(cidr, &taken, c) || prefixes.contains(&c) {
                return bad(
                    "InvalidParameterValue",
                    format!("Prefix {p} is not available in subnet {subnet} ({cidr})"),
                );
            }
            prefixes.push(c);
        }

        // Instance-type checks: prefixes need Nitro; Ipv4AddressesPerInterface.
        if let Some(instance) = instance.as_deref() {
            let (instance_type, limits) = match self.limits(instance).await {
                Ok(l) => l,
                Err(Reject::Ec2(e)) => return Err(Reject::Ec2(e)),
                Err(Reject::Unreachable(e)) => {
                    tracing::debug!(code = %e.code, message = %e.message, "assign limit check skipped");
                    (
                        String::new(),
                        Limits {
                            max_interfaces: 0,
                            cards: HashMap::new(),
                            ipv4_per_interface: None,
                            nitro: true,
                        },
                    )
                }
            };
            if !prefixes.is_empty() && !limits.nitro {
                return bad(
                    "InvalidParameterValue",
                    format!(
                        "IPv4 prefixes are only supported on Nitro instance types; {instance} is {instance_type}"
                    ),
                );
            }
            if let Some(max) = limits.ipv4_per_interface {
                let after = 1 + secondary.len() + own_prefixes + addresses.len() + prefixes.len();
                if after as u64 > max {
                    return bad(
                        "PrivateIpAddressLimitExceeded",
                        format!(
                            "Number of private addresses will exceed limit: {after} > {max} for {instance_type} on {eni}"
                        ),
                    );
                }
            }
        }

        // Addresses go to moto as explicit addresses; prefixes stay here.
        if !addresses.is_empty() {
            let body = self.address_form(
                "AssignPrivateIpAddresses",
                eni,
                addresses
                    .iter()
                    .map(|a| std::net::Ipv4Addr::from(*a).to_string()),
            );
            let up = self
                .shared
                .forward(self.parts, body)
                .await
                .map_err(Reject::Unreachable)?;
            if !up.status.is_success() {
                return Ok(Answer::Upstream(up));
            }
        }
        if !prefixes.is_empty() {
            let mut state = lock(&self.shared.state);
            let entry = state.prefixes.entry(eni.to_string()).or_default();
            entry.subnet = subnet.clone();
            entry.prefixes.extend(prefixes.iter().copied());
        }
        Ok(Answer::Upstream(synthesized(ipam::assign_response(
            &request_id(),
            eni,
            &addresses,
            &prefixes,
        ))))
    }

    /// `UnassignPrivateIpAddresses` as real EC2 does it (rules 7, 3 of [`ipam`]).
    async fn unassign(&self) -> Result<Answer, Reject> {
        let Some(eni) = self.params.get("NetworkInterfaceId") else {
            return self.plain().await;
        };
        let bad = |m: String| {
            Err(Reject::Ec2(Ec2Error::bad_request(
                "InvalidParameterValue",
                m,
            )))
        };
        let addresses = ipam::indexed(self.params, "PrivateIpAddress");
        let prefixes = ipam::indexed(self.params, "Ipv4Prefix");
        let _eni_guard = self.shared.locks.lock(format!("eni/{eni}")).await;
        let Some(EniAddresses {
            primary, secondary, ..
        }) = self.eni_addresses(eni).await?
        else {
            return self.plain().await;
        };
        for a in &addresses {
            match ipam::ip(a) {
                Some(ip) if ip == primary => {
                    return bad(format!(
                        "The primary private IP address {a} of {eni} cannot be unassigned"
                    ));
                }
                Some(ip) if secondary.contains(&ip) => {}
                _ => {
                    return bad(format!(
                        "Some of the specified addresses are not assigned to interface {eni}: {a}"
                    ));
                }
            }
        }
        let mut drop = Vec::new();
        {
            let state = lock(&self.shared.state);
            let own = state
                .prefixes
                .get(eni)
                .map(|p| p.prefixes.as_slice())
                .unwrap_or(&[]);
            for p in &prefixes {
                match ipam::Cidr::parse(p).filter(|c| own.contains(c)) {
                    Some(c) => drop.push(c),
                    None => {
                        return bad(format!(
                            "Some of the specified prefixes are not assigned to interface {eni}: {p}"
                        ));
                    }
                }
            }
        }
        if !addresses.is_empty() {
            let body =
                self.address_form("UnassignPrivateIpAddresses", eni, addresses.iter().cloned());
            let up = self
                .shared
                .forward(self.parts, body)
                .await
                .map_err(Reject::Unreachable)?;
            if !up.status.is_success() {
                return Ok(Answer::Upstream(up));
            }
        }
        if !drop.is_empty() {
            let mut state = lock(&self.shared.state);
            if let Some(entry) = state.prefixes.get_mut(eni) {
                entry.prefixes.retain(|p| !drop.contains(p));
                if entry.prefixes.is_empty() {
                    state.prefixes.remove(eni);
                }
            }
        }
        Ok(Answer::Upstream(synthesized(ipam::unassign_response(
            &request_id(),
        ))))
    }

    async fn modify(&self) -> Result<Answer, Reject> {
        let answer = self.plain().await?;
        if let Answer::Upstream(up) = &answer
            && up.status.is_success()
            && self.config.sticky_delete_on_termination
            && let (Some(id), Some(dot)) = (
                self.params.get("Attachment.AttachmentId"),
                self.params.get("Attachment.DeleteOnTermination"),
            )
        {
            let dot = dot.trim().eq_ignore_ascii_case("true");
            tracing::debug!(
                action = self.action,
                attachment = id,
                dot,
                "DeleteOnTermination"
            );
            lock(&self.shared.state)
                .delete_on_termination
                .insert(id.to_string(), dot);
        }
        Ok(answer)
    }
}

/// A successful answer the fault layer writes itself.
fn synthesized(body: String) -> Upstream {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    Upstream {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(body),
    }
}

/// The `<attachment>` of `attachment_id`, rewritten to `detaching`, keyed by its ENI.
fn capture_detaching(
    root: &Element,
    attachment_id: &str,
    state: &State,
) -> Option<(String, Detaching)> {
    for set in root.find_all("networkInterfaceSet") {
        for item in &set.children {
            let Some(att) = item.child("attachment") else {
                continue;
            };
            if att.child_text("attachmentId") != Some(attachment_id) {
                continue;
            }
            let eni = item.child_text("networkInterfaceId")?.to_string();
            // Re-serialize from the parsed element: status detaching, remembered DOT.
            let mut inner = String::new();
            for c in &att.children {
                let text = match c.name.as_str() {
                    "status" => "detaching".to_string(),
                    "deleteOnTermination" => state
                        .delete_on_termination
                        .get(attachment_id)
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| c.text.trim().to_string()),
                    _ => c.text.trim().to_string(),
                };
                inner.push_str(&format!("<{0}>{1}</{0}>", c.name, xml::escape(&text)));
            }
            let text = |n: &str| att.child_text(n).unwrap_or_default().to_string();
            return Some((
                eni,
                Detaching {
                    attachment_id: attachment_id.to_string(),
                    instance_id: text("instanceId"),
                    device_index: text("deviceIndex"),
                    network_card_index: att
                        .child_text("networkCardIndex")
                        .filter(|s| !s.is_empty())
                        .unwrap_or("0")
                        .to_string(),
                    xml: format!("<attachment>{inner}</attachment>"),
                    until: Instant::now(),
                },
            ));
        }
    }
    None
}

/// `NetworkInfo` of a `DescribeInstanceTypes` response.
fn parse_limits(root: &Element) -> Option<Limits> {
    let info = root.find_all("networkInfo").into_iter().next()?;
    let max_interfaces = info.child_text("maximumNetworkInterfaces")?.parse().ok()?;
    let mut cards = HashMap::new();
    if let Some(set) = info.child("networkCards") {
        for card in &set.children {
            if let (Some(idx), Some(max)) = (
                card.child_text("networkCardIndex"),
                card.child_text("maximumNetworkInterfaces")
                    .and_then(|m| m.parse().ok()),
            ) {
                cards.insert(idx.to_string(), max);
            }
        }
    }
    let ipv4_per_interface = info
        .child_text("ipv4AddressesPerInterface")
        .and_then(|v| v.parse().ok());
    let nitro = root.find_text("hypervisor") == Some("nitro");
    Some(Limits {
        max_interfaces,
        cards,
        ipv4_per_interface,
        nitro,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_key_of_a_signature() {
        let h = HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=replica-1/20261130/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=ab",
        );
        assert_eq!(access_key_id(&h).as_deref(), Some("replica-1"));
        assert_eq!(access_key_id(&HeaderValue::from_static("Bearer x")), None);
    }

    #[test]
    fn params_parse_form_and_fingerprint() {
        let p = Params::parse(
            Some("Version=2016-11-15"),
            b"Action=CreateNetworkInterface&SubnetId=subnet-1&ClientToken=abc&TagSpecification.1.Tag.1.Value=a%20b",
        );
        assert_eq!(p.get("Action"), Some("CreateNetworkInterface"));
        assert_eq!(p.get("TagSpecification.1.Tag.1.Value"), Some("a b"));
        assert_eq!(p.get("Version"), Some("2016-11-15"));
        let fp = p.fingerprint();
        assert!(fp.iter().all(|(k, _)| k != "ClientToken"));
        assert_eq!(fp.len(), 4);
    }

    #[test]
    fn upstream_must_be_loopback_http() {
        assert!(loopback_upstream("http://127.0.0.1:5000").is_ok());
        assert!(loopback_upstream("http://localhost:5000/").is_ok());
        assert!(loopback_upstream("http://[::1]:5000").is_ok());
        assert!(loopback_upstream("https://127.0.0.1:5000").is_err());
        assert!(loopback_upstream("http://10.0.0.1:5000").is_err());
        assert!(loopback_upstream("http://ec2.us-east-1.amazonaws.com").is_err());
        assert!(loopback_upstream("not a url").is_err());
    }

    const ATTACHED: &str = r#"<DescribeNetworkInterfacesResponse><networkInterfaceSet><item><attachment><attachmentId>eni-attach-0</attachmentId><deleteOnTermination>true</deleteOnTermination><deviceIndex>0</deviceIndex><networkCardIndex>0</networkCardIndex><instanceId>i-1</instanceId><status>attached</status></attachment><groupSet><item><groupId>sg-1</groupId></item></groupSet><networkInterfaceId>eni-0</networkInterfaceId><status>in-use</status></item><item><attachment><attachmentId>eni-attach-1</attachmentId><deleteOnTermination>false</deleteOnTermination><deviceIndex>1</deviceIndex><instanceId>i-1</instanceId><status>attached</status></attachment><networkInterfaceId>eni-1</networkInterfaceId><status>in-use</status></item><item><networkInterfaceId>eni-2</networkInterfaceId><status>available</status></item></networkInterfaceSet></DescribeNetworkInterfacesResponse>"#;

    #[test]
    fn attachments_of_describe() -> Result<(), xml::XmlError> {
        let root = xml::parse(ATTACHED)?;
        let atts = attachments(&root);
        assert_eq!(atts.len(), 2, "nested groupSet items are not ENIs");
        assert_eq!(atts[1].network_interface_id, "eni-1");
        assert_eq!(atts[1].device_index, "1");
        assert_eq!(atts[1].network_card_index, "0", "absent card index is 0");
        Ok(())
    }

    #[test]
    fn rewrite_dot_attaching_and_detaching() -> Result<(), xml::XmlError> {
        let mut state = State::default();
        state
            .delete_on_termination
            .insert("eni-attach-1".into(), true);
        state.attaching.insert(
            "eni-attach-0".into(),
            Instant::now() + Duration::from_secs(60),
        );
        let root = xml::parse(ATTACHED)?;
        // Capture eni-1's attachment as detaching, then pretend moto dropped it.
        let (eni, mut d) = capture_detaching(&root, "eni-attach-1", &state)
            .ok_or_else(|| xml::XmlError::from_test("not captured"))?;
        assert_eq!(eni, "eni-1");
        assert!(d.xml.contains("<status>detaching</status>"));
        assert!(
            d.xml
                .contains("<deleteOnTermination>true</deleteOnTermination>")
        );
        d.until = Instant::now() + Duration::from_secs(60);
        state.detaching.insert("eni-2".into(), d);

        let mut edits = Edits::default();
        for att in root.find_all("attachment") {
            patch_attachment(att, &state, &mut edits);
        }
        let out = edits.apply(ATTACHED);
        let root = xml::parse(&out)?;
        let atts = attachments(&root);
        assert_eq!(atts[0].status, "attaching");
        let dots: Vec<_> = root
            .find_all("attachment")
            .iter()
            .map(|a| {
                a.child_text("deleteOnTermination")
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(dots, ["true", "true"]);
        Ok(())
    }

    #[test]
    fn limits_of_instance_type() -> Result<(), xml::XmlError> {
        let root = xml::parse(
            "<R><instanceTypeSet><item><networkInfo><maximumNetworkInterfaces>3</maximumNetworkInterfaces><networkCards><item><networkCardIndex>0</networkCardIndex><maximumNetworkInterfaces>3</maximumNetworkInterfaces></item></networkCards></networkInfo></item></instanceTypeSet></R>",
        )?;
        let l = parse_limits(&root).ok_or_else(|| xml::XmlError::from_test("no limits"))?;
        assert_eq!(l.max_interfaces, 3);
        assert_eq!(l.cards.get("0"), Some(&3));
        Ok(())
    }
}
