//! The EC2 fault layer in front of a real moto, driven by the Rust aws-sdk-ec2.

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    AttachmentStatus, InstanceType, NetworkInterfaceAttachmentChanges, NetworkInterfaceStatus,
};
use eni_testkit::faults::{BucketSpec, FailureRule, FaultConfig, FaultProxy};
use eni_testkit::{Moto, eventually};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// One moto for the whole test binary; each test starts its own proxy and instances.
async fn moto() -> &'static Moto {
    static MOTO: OnceCell<Moto> = OnceCell::const_new();
    MOTO.get_or_init(|| async {
        Moto::start()
            .await
            .unwrap_or_else(|e| panic!("start moto: {e}"))
    })
    .await
}

async fn proxy(config: FaultConfig) -> FaultProxy {
    FaultProxy::start(&moto().await.endpoint, config)
        .await
        .unwrap_or_else(|e| panic!("start proxy: {e}"))
}

/// An EC2 client without retries, so every error is seen.
fn ec2(endpoint: &str) -> Client {
    eni_testkit::ec2_client(endpoint)
}

/// The error code and HTTP status of a failed call.
fn failure<T, E: ProvideErrorMetadata>(
    r: &Result<T, SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>,
) -> Option<(String, u16, String)> {
    let e = r.as_ref().err()?;
    Some((
        e.code().unwrap_or_default().to_string(),
        e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0),
        e.message().unwrap_or_default().to_string(),
    ))
}

/// A fresh m5.large (3 ENIs, primary at device index 0) and its subnet.
async fn instance(
    ec2: &Client,
) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    let out = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::M5Large)
        .min_count(1)
        .max_count(1)
        .send()
        .await?;
    let i = out.instances().first().ok_or("no instance")?;
    let id = i.instance_id().ok_or("no instance id")?.to_string();
    let subnet = i.subnet_id().ok_or("no subnet")?.to_string();
    Ok((id, subnet))
}

async fn create_eni(
    ec2: &Client,
    subnet: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let out = ec2
        .create_network_interface()
        .subnet_id(subnet)
        .send()
        .await?;
    Ok(out
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .ok_or("no ENI id")?
        .to_string())
}

async fn attach(
    ec2: &Client,
    eni: &str,
    instance: &str,
    index: i32,
) -> Result<
    aws_sdk_ec2::operation::attach_network_interface::AttachNetworkInterfaceOutput,
    SdkError<
        aws_sdk_ec2::operation::attach_network_interface::AttachNetworkInterfaceError,
        aws_sdk_ec2::config::http::HttpResponse,
    >,
> {
    ec2.attach_network_interface()
        .network_interface_id(eni)
        .instance_id(instance)
        .device_index(index)
        .send()
        .await
}

async fn describe_eni(
    ec2: &Client,
    eni: &str,
) -> Result<aws_sdk_ec2::types::NetworkInterface, Box<dyn std::error::Error + Send + Sync>> {
    let out = ec2
        .describe_network_interfaces()
        .network_interface_ids(eni)
        .send()
        .await?;
    Ok(out
        .network_interfaces()
        .first()
        .ok_or("ENI not found")?
        .clone())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn throttling_after_the_burst_then_refill() -> TestResult {
    // Buckets 10x smaller: Describe* 10 burst, 2 per second.
    let mut config = FaultConfig::default();
    config.throttle.scale = 0.1;
    let proxy = proxy(config).await;
    let ec2 = ec2(&proxy.endpoint);

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..15 {
        let ec2 = ec2.clone();
        set.spawn(async move { failure(&ec2.describe_vpcs().send().await) });
    }
    let mut ok = 0;
    let mut throttled = 0;
    while let Some(r) = set.join_next().await {
        match r? {
            None => ok += 1,
            Some((code, status, _)) => {
                assert_eq!((code.as_str(), status), ("RequestLimitExceeded", 503));
                throttled += 1;
            }
        }
    }
    // All 15 arrive within far less than the 500 ms one token takes to refill.
    assert_eq!((ok, throttled), (10, 5));
    let stats = proxy.stats().action("DescribeVpcs");
    assert_eq!((stats.forwarded, stats.throttled), (10, 5));
    assert_eq!(stats.errors.get("RequestLimitExceeded"), Some(&5));

    // Other actions have buckets of their own.
    ec2.describe_subnets().send().await?;

    // One token refills in 500 ms.
    let refilled = eventually(Duration::from_secs(3), || async {
        ec2.describe_vpcs().send().await.ok().map(|_| ())
    })
    .await;
    assert!(refilled.is_some(), "bucket refills");
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn duplicate_device_index_rejected_even_concurrently() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;

    // The primary ENI holds device index 0.
    let a = create_eni(&ec2, &subnet).await?;
    let (code, status, message) =
        failure(&attach(&ec2, &a, &instance, 0).await).ok_or("attach at 0 succeeded")?;
    assert_eq!((code.as_str(), status), ("InvalidParameterValue", 400));
    assert_eq!(
        message,
        format!("Instance '{instance}' already has an interface attached at device index '0'.")
    );

    // Two ENIs race for device index 1: exactly one wins.
    let b = create_eni(&ec2, &subnet).await?;
    let (ra, rb) = tokio::join!(
        attach(&ec2, &a, &instance, 1),
        attach(&ec2, &b, &instance, 1)
    );
    let failures: Vec<_> = [failure(&ra), failure(&rb)].into_iter().flatten().collect();
    assert_eq!(failures.len(), 1, "one attach wins: {failures:?}");
    assert_eq!(failures[0].0, "InvalidParameterValue");
    let loser = if ra.is_ok() { &b } else { &a };
    attach(&ec2, loser, &instance, 2).await?;

    let stats = proxy.stats().action("AttachNetworkInterface");
    assert_eq!((stats.forwarded, stats.rejected), (2, 2));
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn attachment_limit_of_m5_large() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    for index in 1..=2 {
        let eni = create_eni(&ec2, &subnet).await?;
        attach(&ec2, &eni, &instance, index).await?;
    }
    let fourth = create_eni(&ec2, &subnet).await?;
    let (code, status, message) =
        failure(&attach(&ec2, &fourth, &instance, 3).await).ok_or("4th ENI attached")?;
    assert_eq!((code.as_str(), status), ("AttachmentLimitExceeded", 400));
    assert!(message.contains("m5.large"), "{message}");

    // moto itself would have taken it.
    proxy.update_config(|c| c.enforce_attachment_limits = false);
    attach(&ec2, &fourth, &instance, 3).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn deleting_an_attached_eni_is_refused() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    let eni = create_eni(&ec2, &subnet).await?;
    let attachment = attach(&ec2, &eni, &instance, 1)
        .await?
        .attachment_id()
        .ok_or("no attachment id")?
        .to_string();

    let r = ec2
        .delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await;
    let (code, status, message) = failure(&r).ok_or("in-use ENI deleted")?;
    assert_eq!(
        (code.as_str(), status),
        ("InvalidNetworkInterface.InUse", 400)
    );
    assert!(message.contains(&eni));
    assert!(describe_eni(&ec2, &eni).await.is_ok(), "still there");

    ec2.detach_network_interface()
        .attachment_id(&attachment)
        .send()
        .await?;
    let available = eventually(Duration::from_secs(10), || async {
        let n = describe_eni(&ec2, &eni).await.ok()?;
        (n.status() == Some(&NetworkInterfaceStatus::Available)).then_some(())
    })
    .await;
    assert!(available.is_some(), "ENI available after detach");
    ec2.delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await?;
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn client_token_returns_the_same_eni() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (_, subnet) = instance(&ec2).await?;
    let token = format!("ct-{subnet}-{}", std::process::id());
    let create = |description: &'static str| {
        ec2.create_network_interface()
            .subnet_id(&subnet)
            .description(description)
            .client_token(&token)
            .send()
    };
    let id =
        |o: &aws_sdk_ec2::operation::create_network_interface::CreateNetworkInterfaceOutput| {
            o.network_interface()
                .and_then(|n| n.network_interface_id())
                .map(str::to_string)
        };
    let first = id(&create("ct").await?).ok_or("no id")?;
    let second = id(&create("ct").await?).ok_or("no id")?;
    assert_eq!(first, second);

    let r = create("different").await;
    let (code, status, _) = failure(&r).ok_or("mismatch accepted")?;
    assert_eq!(
        (code.as_str(), status),
        ("IdempotentParameterMismatch", 400)
    );

    // Only one ENI with that description exists in moto.
    let all = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("subnet-id")
                .values(&subnet)
                .build(),
        )
        .send()
        .await?;
    let mine = all
        .network_interfaces()
        .iter()
        .filter(|n| n.network_interface_id() == Some(first.as_str()))
        .count();
    assert_eq!(mine, 1);
    let stats = proxy.stats().action("CreateNetworkInterface");
    assert_eq!((stats.forwarded, stats.replayed, stats.rejected), (1, 1, 1));

    // A create that took effect but answered 500: the retry with the same token gets
    // the ENI that was made.
    proxy.update_config(|c| {
        c.rules.push(FailureRule {
            after_forward: true,
            times: Some(1),
            ..FailureRule::internal_error("CreateNetworkInterface")
        })
    });
    let token2 = format!("{token}-2");
    let lost = ec2
        .create_network_interface()
        .subnet_id(&subnet)
        .client_token(&token2)
        .send()
        .await;
    assert_eq!(
        failure(&lost).map(|f| (f.0, f.1)),
        Some(("InternalError".into(), 500))
    );
    let retried = ec2
        .create_network_interface()
        .subnet_id(&subnet)
        .client_token(&token2)
        .send()
        .await?;
    assert!(id(&retried).is_some());
    let stats = proxy.stats().action("CreateNetworkInterface");
    assert_eq!((stats.injected, stats.replayed), (1, 2));
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn delete_on_termination_sticks_and_modifications_hold() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    let eni = create_eni(&ec2, &subnet).await?;
    let attachment = attach(&ec2, &eni, &instance, 1)
        .await?
        .attachment_id()
        .ok_or("no attachment id")?
        .to_string();
    let dot = |v: bool| {
        ec2.modify_network_interface_attribute()
            .network_interface_id(&eni)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(&attachment)
                    .delete_on_termination(v)
                    .build(),
            )
            .send()
    };
    let described = |ec2: Client, eni: String| async move {
        describe_eni(&ec2, &eni)
            .await
            .ok()
            .and_then(|n| n.attachment().and_then(|a| a.delete_on_termination()))
    };
    assert_eq!(described(ec2.clone(), eni.clone()).await, Some(false));
    dot(true).await?;
    assert_eq!(described(ec2.clone(), eni.clone()).await, Some(true));

    // Also in DescribeInstances.
    let out = ec2
        .describe_instances()
        .instance_ids(&instance)
        .send()
        .await?;
    let in_instance: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .flat_map(|i| i.network_interfaces())
        .filter(|n| n.network_interface_id() == Some(eni.as_str()))
        .filter_map(|n| n.attachment().and_then(|a| a.delete_on_termination()))
        .collect();
    assert_eq!(in_instance, [true]);

    dot(false).await?;
    assert_eq!(described(ec2.clone(), eni.clone()).await, Some(false));

    // moto keeps description and security group changes by itself.
    let sg = ec2
        .create_security_group()
        .group_name(format!("faults-{eni}"))
        .description("drift")
        .send()
        .await?
        .group_id()
        .ok_or("no group id")?
        .to_string();
    ec2.modify_network_interface_attribute()
        .network_interface_id(&eni)
        .groups(&sg)
        .send()
        .await?;
    ec2.modify_network_interface_attribute()
        .network_interface_id(&eni)
        .description(
            aws_sdk_ec2::types::AttributeValue::builder()
                .value("changed")
                .build(),
        )
        .send()
        .await?;
    let n = describe_eni(&ec2, &eni).await?;
    let groups: Vec<_> = n.groups().iter().filter_map(|g| g.group_id()).collect();
    assert_eq!(groups, [sg.as_str()]);
    assert_eq!(n.description(), Some("changed"));
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn injected_5xx_and_rules() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    ec2.describe_vpcs().send().await?;

    proxy.update_config(|c| c.error_rate = 1.0);
    let (code, status, _) = failure(&ec2.describe_vpcs().send().await).ok_or("no 5xx")?;
    assert_eq!((code.as_str(), status), ("InternalError", 500));

    // A rule failing the next two calls of one action only.
    proxy.update_config(|c| {
        c.error_rate = 0.0;
        c.rules.push(FailureRule {
            code: "Unavailable".into(),
            status: 503,
            times: Some(2),
            ..FailureRule::internal_error("DescribeVpcs")
        });
    });
    ec2.describe_subnets().send().await?;
    for _ in 0..2 {
        let f = failure(&ec2.describe_vpcs().send().await).ok_or("rule did not fire")?;
        assert_eq!((f.0.as_str(), f.1), ("Unavailable", 503));
    }
    ec2.describe_vpcs().send().await?;
    assert_eq!(proxy.config().rules[0].times, Some(0), "rule spent");

    let stats = proxy.stats();
    assert_eq!(stats.action("DescribeVpcs").injected, 3);
    assert_eq!(stats.action("DescribeVpcs").forwarded, 2);
    assert_eq!(stats.total.injected, 3);

    // With the SDK's standard retries a rare 5xx is invisible to the caller.
    proxy.update_config(|c| {
        c.rules = vec![FailureRule {
            times: Some(1),
            ..FailureRule::internal_error("DescribeVpcs")
        }]
    });
    let retrying = Client::from_conf(
        ec2.config()
            .to_builder()
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .build(),
    );
    retrying.describe_vpcs().send().await?;
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn attaching_and_detaching_windows() -> TestResult {
    let config = FaultConfig {
        attach_delay_ms: 1500,
        detach_delay_ms: 1500,
        ..FaultConfig::default()
    };
    let proxy = proxy(config).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    let eni = create_eni(&ec2, &subnet).await?;
    let attachment = attach(&ec2, &eni, &instance, 1)
        .await?
        .attachment_id()
        .ok_or("no attachment id")?
        .to_string();
    let status = |ec2: Client, eni: String| async move {
        describe_eni(&ec2, &eni)
            .await
            .ok()
            .and_then(|n| n.attachment().and_then(|a| a.status().cloned()))
    };
    assert_eq!(
        status(ec2.clone(), eni.clone()).await,
        Some(AttachmentStatus::Attaching)
    );
    let attached = eventually(Duration::from_secs(10), || async {
        (status(ec2.clone(), eni.clone()).await == Some(AttachmentStatus::Attached)).then_some(())
    })
    .await;
    assert!(attached.is_some(), "attaching -> attached");

    ec2.detach_network_interface()
        .attachment_id(&attachment)
        .send()
        .await?;
    let n = describe_eni(&ec2, &eni).await?;
    assert_eq!(
        n.attachment().and_then(|a| a.status()),
        Some(&AttachmentStatus::Detaching)
    );
    assert_eq!(n.status(), Some(&NetworkInterfaceStatus::InUse));
    // A detaching ENI cannot be deleted yet.
    let r = ec2
        .delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0),
        Some("InvalidNetworkInterface.InUse".into())
    );
    let available = eventually(Duration::from_secs(10), || async {
        let n = describe_eni(&ec2, &eni).await.ok()?;
        (n.status() == Some(&NetworkInterfaceStatus::Available) && n.attachment().is_none())
            .then_some(())
    })
    .await;
    assert!(available.is_some(), "detaching -> available");
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn hung_detach_ends_with_a_forced_detach_and_calls_count_per_eni() -> TestResult {
    // A detach that hangs (10 minutes) until someone forces it.
    let config = FaultConfig {
        detach_delay_ms: 600_000,
        ..FaultConfig::default()
    };
    let proxy = proxy(config).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    let eni = create_eni(&ec2, &subnet).await?;
    let attachment = attach(&ec2, &eni, &instance, 1)
        .await?
        .attachment_id()
        .ok_or("no attachment id")?
        .to_string();
    ec2.detach_network_interface()
        .attachment_id(&attachment)
        .send()
        .await?;
    let n = describe_eni(&ec2, &eni).await?;
    assert_eq!(
        n.attachment().and_then(|a| a.status()),
        Some(&AttachmentStatus::Detaching)
    );
    // Still hung: a graceful retry changes nothing (moto no longer knows the attachment).
    let _ = ec2
        .detach_network_interface()
        .attachment_id(&attachment)
        .send()
        .await;
    assert_eq!(
        describe_eni(&ec2, &eni)
            .await?
            .attachment()
            .and_then(|a| a.status()),
        Some(&AttachmentStatus::Detaching)
    );
    ec2.detach_network_interface()
        .attachment_id(&attachment)
        .force(true)
        .send()
        .await?;
    let n = describe_eni(&ec2, &eni).await?;
    assert!(n.attachment().is_none(), "{:?}", n.attachment());
    assert_eq!(n.status(), Some(&NetworkInterfaceStatus::Available));
    ec2.delete_network_interface()
        .network_interface_id(&eni)
        .send()
        .await?;

    // create, attach, 3 detaches (found through the attachment), delete.
    let stats = proxy.stats();
    let per_eni = stats.enis.get(&eni).ok_or("no counters for the ENI")?;
    assert_eq!(per_eni.requests, 6, "{per_eni:?}");
    assert!(
        stats.enis.keys().all(|k| !k.starts_with("attachment:")),
        "{:?}",
        stats.enis.keys()
    );
    Ok(())
}

/// One HTTP/1.0 request to the control endpoints.
async fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn binary_prints_its_address_and_serves_control_endpoints() -> TestResult {
    let moto = moto().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ec2-faults"))
        .args(["--listen", "127.0.0.1:0", "--upstream", &moto.endpoint])
        .env("EC2_FAULTS_BUCKET_SCALE", "0.1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await??
        .ok_or("no output")?;
    let endpoint = line
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("unexpected first line {line:?}"))?
        .to_string();
    let addr = endpoint.trim_start_matches("http://").to_string();

    let config = http(&addr, "GET", "/_faults/config", "").await?;
    assert!(config.contains("\"scale\": 0.1"), "{config}");

    let ec2 = ec2(&endpoint);
    ec2.describe_vpcs().send().await?;
    let patched = http(&addr, "POST", "/_faults/config", r#"{"error_rate": 1.0}"#).await?;
    assert!(patched.starts_with("HTTP/1.0 200") || patched.starts_with("HTTP/1.1 200"));
    let f = failure(&ec2.describe_vpcs().send().await).ok_or("no injected error")?;
    assert_eq!(f.0, "InternalError");
    let bad = http(&addr, "POST", "/_faults/config", r#"{"nope": 1}"#).await?;
    assert!(bad.contains(" 400 "), "{bad}");

    let stats = http(&addr, "GET", "/_faults/stats", "").await?;
    let json = stats.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    assert_eq!(v["actions"]["DescribeVpcs"]["forwarded"], 1);
    assert_eq!(v["actions"]["DescribeVpcs"]["injected"], 1);

    http(&addr, "POST", "/_faults/reset", "").await?;
    let stats = http(&addr, "GET", "/_faults/stats", "").await?;
    assert!(!stats.contains("DescribeVpcs"), "{stats}");
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn per_action_bucket_override() -> TestResult {
    let mut config = FaultConfig::default();
    config
        .throttle
        .actions
        .insert("DescribeVpcs".into(), BucketSpec::new(2.0, 0.0));
    let proxy = proxy(config).await;
    let ec2 = ec2(&proxy.endpoint);
    ec2.describe_vpcs().send().await?;
    ec2.describe_vpcs().send().await?;
    let f = failure(&ec2.describe_vpcs().send().await).ok_or("not throttled")?;
    assert_eq!(f.0, "RequestLimitExceeded");
    // reset refills the buckets.
    proxy.reset();
    ec2.describe_vpcs().send().await?;
    assert_eq!(proxy.stats().total.requests, 1);
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn describe_pagination_and_attachment_filters() -> TestResult {
    use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let (instance, subnet) = instance(&ec2).await?;
    let key = format!("pages-{instance}");
    let mut enis = Vec::new();
    for _ in 0..7 {
        let out = ec2
            .create_network_interface()
            .subnet_id(&subnet)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::NetworkInterface)
                    .tags(Tag::builder().key(&key).value("x").build())
                    .build(),
            )
            .send()
            .await?;
        enis.push(
            out.network_interface()
                .and_then(|n| n.network_interface_id())
                .ok_or("no id")?
                .to_string(),
        );
    }
    attach(&ec2, &enis[0], &instance, 1).await?;

    let by_tag = Filter::builder().name("tag-key").values(&key).build();
    let first = ec2
        .describe_network_interfaces()
        .filters(by_tag.clone())
        .max_results(5)
        .send()
        .await?;
    assert_eq!(first.network_interfaces().len(), 5);
    let token = first.next_token().ok_or("no NextToken")?;
    let second = ec2
        .describe_network_interfaces()
        .filters(by_tag.clone())
        .max_results(5)
        .next_token(token)
        .send()
        .await?;
    assert_eq!(second.network_interfaces().len(), 2);
    assert_eq!(second.next_token(), None);

    // The SDK paginator walks all pages.
    let pages: Vec<_> = ec2
        .describe_network_interfaces()
        .filters(by_tag.clone())
        .max_results(5)
        .into_paginator()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await?;
    let mut seen: Vec<_> = pages
        .iter()
        .flat_map(|p| p.network_interfaces())
        .filter_map(|n| n.network_interface_id().map(str::to_string))
        .collect();
    seen.sort();
    enis.sort();
    assert_eq!(seen, enis);

    // attachment.status (HTTP 500 from moto itself) together with a moto filter.
    let attached = ec2
        .describe_network_interfaces()
        .filters(by_tag)
        .filters(
            Filter::builder()
                .name("attachment.status")
                .values("attached")
                .build(),
        )
        .send()
        .await?;
    let ids: Vec<_> = attached
        .network_interfaces()
        .iter()
        .filter_map(|n| n.network_interface_id())
        .collect();
    assert_eq!(ids.len(), 1);
    let on_instance = ec2
        .describe_network_interfaces()
        .filters(
            Filter::builder()
                .name("attachment.device-index")
                .values("0")
                .build(),
        )
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(&instance)
                .build(),
        )
        .send()
        .await?;
    assert_eq!(on_instance.network_interfaces().len(), 1, "the primary ENI");
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn latency_is_added_and_classes_are_counted() -> TestResult {
    let mut config = FaultConfig::default();
    config.latency.min_ms = 150;
    config.latency.max_ms = 200;
    let proxy = proxy(config).await;
    let ec2 = ec2(&proxy.endpoint);
    ec2.describe_vpcs().send().await?;
    let started = std::time::Instant::now();
    ec2.describe_vpcs().send().await?;
    assert!(started.elapsed() >= Duration::from_millis(150));
    let r = ec2
        .delete_network_interface()
        .network_interface_id("eni-doesnotexist")
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0),
        Some("InvalidNetworkInterfaceID.NotFound".into())
    );
    let stats = proxy.stats();
    assert_eq!(
        (stats.describe_requests(), stats.mutating_requests()),
        (2, 1)
    );
    assert_eq!(stats.mutating.upstream_errors, 1);
    assert_eq!(
        stats
            .action("DeleteNetworkInterface")
            .errors
            .get("InvalidNetworkInterfaceID.NotFound"),
        Some(&1)
    );
    Ok(())
}

/// A VPC and a subnet of its own (`cidr`), so the addresses free in it depend on this
/// test alone.
async fn own_subnet(
    ec2: &Client,
    vpc_cidr: &str,
    cidr: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let vpc = ec2.create_vpc().cidr_block(vpc_cidr).send().await?;
    let vpc = vpc.vpc().and_then(|v| v.vpc_id()).ok_or("no vpc id")?;
    let subnet = ec2
        .create_subnet()
        .vpc_id(vpc)
        .cidr_block(cidr)
        .send()
        .await?;
    Ok(subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .ok_or("no subnet id")?
        .to_string())
}

/// An instance of `instance_type` in `subnet`.
async fn instance_in(
    ec2: &Client,
    instance_type: InstanceType,
    subnet: &str,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let out = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(instance_type)
        .subnet_id(subnet)
        .min_count(1)
        .max_count(1)
        .send()
        .await?;
    Ok(out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .ok_or("no instance id")?
        .to_string())
}

/// (primary, secondary addresses, prefixes) of an ENI as described.
async fn addresses_of(
    ec2: &Client,
    eni: &str,
) -> Result<(String, Vec<String>, Vec<String>), Box<dyn std::error::Error + Send + Sync>> {
    let d = describe_eni(ec2, eni).await?;
    let mut primary = String::new();
    let mut secondary = Vec::new();
    for a in d.private_ip_addresses() {
        let ip = a.private_ip_address().unwrap_or_default().to_string();
        if a.primary() == Some(true) {
            primary = ip;
        } else {
            secondary.push(ip);
        }
    }
    let prefixes = d
        .ipv4_prefixes()
        .iter()
        .filter_map(|p| p.ipv4_prefix().map(str::to_string))
        .collect();
    Ok((primary, secondary, prefixes))
}

fn v4(s: &str) -> u32 {
    u32::from(
        s.parse::<std::net::Ipv4Addr>()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
    )
}

/// Whether `ip` is one of the five addresses AWS reserves in `subnet_base/len`.
fn reserved(subnet_base: &str, len: u32, ip: &str) -> bool {
    let base = v4(subnet_base);
    let last = base | (u32::MAX >> len);
    let ip = v4(ip);
    ip - base < 4 || ip == last
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn secondary_addresses_as_ec2_assigns_them() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let subnet = own_subnet(&ec2, "10.61.0.0/16", "10.61.1.0/24").await?;
    // m5.large: 10 addresses per interface.
    let instance = instance_in(&ec2, InstanceType::M5Large, &subnet).await?;
    let eni = create_eni(&ec2, &subnet).await?;
    attach(&ec2, &eni, &instance, 1).await?;
    let (primary, before, _) = addresses_of(&ec2, &eni).await?;
    assert!(before.is_empty());

    // The answer lists only the new addresses, never a reserved one.
    let out = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(3)
        .send()
        .await?;
    let mut got: Vec<String> = out
        .assigned_private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address().map(str::to_string))
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(!got.contains(&primary));
    assert!(got.iter().all(|a| !reserved("10.61.1.0", 24, a)), "{got:?}");
    let (_, mut now, _) = addresses_of(&ec2, &eni).await?;
    got.sort();
    now.sort();
    assert_eq!(got, now);

    // Primary + 3 + 7 = 11 > 10: refused as a whole.
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(7)
        .send()
        .await;
    let (code, status, _) = failure(&r).ok_or("over the limit accepted")?;
    assert_eq!(
        (code.as_str(), status),
        ("PrivateIpAddressLimitExceeded", 400)
    );
    assert_eq!(addresses_of(&ec2, &eni).await?.1.len(), 3);
    // Exactly to the limit is fine.
    ec2.assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(6)
        .send()
        .await?;
    assert_eq!(addresses_of(&ec2, &eni).await?.1.len(), 9);

    // Explicit reserved address, addresses and prefixes mixed: refused.
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses("10.61.1.1")
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(1)
        .ipv4_prefix_count(1)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterCombination")
    );

    // Unassign: never the primary, only addresses the ENI has; all or nothing.
    let r = ec2
        .unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&primary)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );
    let r = ec2
        .unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&got[0])
        .private_ip_addresses("10.61.1.250")
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );
    assert_eq!(addresses_of(&ec2, &eni).await?.1.len(), 9);
    ec2.unassign_private_ip_addresses()
        .network_interface_id(&eni)
        .private_ip_addresses(&got[0])
        .private_ip_addresses(&got[1])
        .send()
        .await?;
    let (_, left, _) = addresses_of(&ec2, &eni).await?;
    assert_eq!(left.len(), 7);
    assert!(!left.contains(&got[0]) && !left.contains(&got[1]));

    let stats = proxy.stats().action("AssignPrivateIpAddresses");
    assert_eq!(stats.forwarded, 2);
    assert_eq!(stats.rejected, 3);
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn a_full_subnet_hands_out_no_reserved_address() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    // 16 addresses, 5 reserved, one the ENI's primary (moto may pick a reserved one).
    let subnet = own_subnet(&ec2, "10.62.0.0/16", "10.62.7.0/28").await?;
    let eni = create_eni(&ec2, &subnet).await?;
    let (primary, _, _) = addresses_of(&ec2, &eni).await?;
    let free = if reserved("10.62.7.0", 28, &primary) {
        11
    } else {
        10
    };
    // Not attached: no per-interface limit.
    let out = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(free)
        .send()
        .await?;
    let got: Vec<&str> = out
        .assigned_private_ip_addresses()
        .iter()
        .filter_map(|a| a.private_ip_address())
        .collect();
    assert_eq!(got.len(), free as usize);
    assert!(got.iter().all(|a| !reserved("10.62.7.0", 28, a)), "{got:?}");
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&eni)
        .secondary_private_ip_address_count(1)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InsufficientFreeAddressesInSubnet")
    );
    Ok(())
}

#[tokio::test]
#[ignore = "integration: needs moto (make test-integration)"]
async fn prefixes_on_nitro_only_and_described() -> TestResult {
    let proxy = proxy(FaultConfig::default()).await;
    let ec2 = ec2(&proxy.endpoint);
    let subnet = own_subnet(&ec2, "10.63.0.0/16", "10.63.2.0/24").await?;
    let nitro = instance_in(&ec2, InstanceType::M5Large, &subnet).await?;
    let xen = instance_in(&ec2, InstanceType::T2Medium, &subnet).await?;
    // Every ENI up front: moto picks their primary addresses itself, knowing nothing of
    // prefixes (not modelled, see faults::ipam).
    let a = create_eni(&ec2, &subnet).await?;
    let b = create_eni(&ec2, &subnet).await?;
    let c = create_eni(&ec2, &subnet).await?;
    let other = create_eni(&ec2, &subnet).await?;
    attach(&ec2, &a, &nitro, 1).await?;
    attach(&ec2, &b, &xen, 1).await?;

    let out = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&a)
        .ipv4_prefix_count(2)
        .send()
        .await?;
    assert!(out.assigned_private_ip_addresses().is_empty());
    let prefixes: Vec<String> = out
        .assigned_ipv4_prefixes()
        .iter()
        .filter_map(|p| p.ipv4_prefix().map(str::to_string))
        .collect();
    assert_eq!(prefixes.len(), 2, "{prefixes:?}");
    // Every address a prefix covers is free: no reserved one, no ENI's address.
    let mut used = Vec::new();
    let all = ec2
        .describe_network_interfaces()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("subnet-id")
                .values(&subnet)
                .build(),
        )
        .send()
        .await?;
    for n in all.network_interfaces() {
        for ip in n.private_ip_addresses() {
            used.push(v4(ip.private_ip_address().unwrap_or_default()));
        }
    }
    for p in &prefixes {
        let (base, len) = p.split_once('/').ok_or("prefix")?;
        assert_eq!(len, "28");
        let base = v4(base);
        assert_eq!(base % 16, 0, "{p} aligned");
        for ip in base..base + 16 {
            let dotted = std::net::Ipv4Addr::from(ip).to_string();
            assert!(!reserved("10.63.2.0", 24, &dotted), "{p} covers {dotted}");
            assert!(!used.contains(&ip), "{p} covers a used {dotted}");
        }
    }
    let (_, _, described) = addresses_of(&ec2, &a).await?;
    assert_eq!(described, prefixes);

    // Each prefix counts one toward m5.large's 10: primary + 2 + 8 = 11.
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&a)
        .ipv4_prefix_count(8)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("PrivateIpAddressLimitExceeded")
    );
    // Addresses by count never land inside a prefix.
    let out = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&other)
        .secondary_private_ip_address_count(40)
        .send()
        .await?;
    for ip in out.assigned_private_ip_addresses() {
        let ip = v4(ip.private_ip_address().unwrap_or_default());
        for p in &prefixes {
            let base = v4(p.split_once('/').map(|(b, _)| b).unwrap_or_default());
            assert!(!(base..base + 16).contains(&ip), "address inside {p}");
        }
    }

    // Not on Xen.
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&b)
        .ipv4_prefix_count(1)
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );

    // Unassign a prefix; an unknown one is refused.
    let r = ec2
        .unassign_private_ip_addresses()
        .network_interface_id(&a)
        .ipv4_prefixes("10.63.2.240/28")
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );
    ec2.unassign_private_ip_addresses()
        .network_interface_id(&a)
        .ipv4_prefixes(&prefixes[0])
        .send()
        .await?;
    assert_eq!(addresses_of(&ec2, &a).await?.2, prefixes[1..].to_vec());

    // The freed prefix can be assigned again, explicitly, to another ENI.
    attach(&ec2, &c, &nitro, 2).await?;
    let out = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&c)
        .ipv4_prefixes(&prefixes[0])
        .send()
        .await?;
    assert_eq!(
        out.assigned_ipv4_prefixes()
            .first()
            .and_then(|p| p.ipv4_prefix()),
        Some(prefixes[0].as_str())
    );
    // A prefix held by another ENI is not available.
    let r = ec2
        .assign_private_ip_addresses()
        .network_interface_id(&a)
        .ipv4_prefixes(&prefixes[0])
        .send()
        .await;
    assert_eq!(
        failure(&r).map(|f| f.0).as_deref(),
        Some("InvalidParameterValue")
    );
    Ok(())
}
