//! EC2 error mapping and retries of the AWS adapter, with `aws-smithy-mocks` standing in
//! for EC2 (unit tier: no network). Time is paused, so backoff sleeps cost nothing.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ErrorMetadata;
use aws_sdk_ec2::operation::attach_network_interface::{
    AttachNetworkInterfaceError, AttachNetworkInterfaceOutput,
};
use aws_sdk_ec2::operation::create_network_interface::CreateNetworkInterfaceError;
use aws_sdk_ec2::operation::delete_network_interface::DeleteNetworkInterfaceError;
use aws_sdk_ec2::operation::describe_network_interfaces::DescribeNetworkInterfacesError;
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use eni_controller::ec2::aws::AwsEc2;
use eni_controller::ec2::{Ec2, ErrorKind, NewEni};
use eni_controller::metrics::Metrics;
use eni_controller::ratelimit::RateLimiter;

fn meta(code: &str, message: &str) -> ErrorMetadata {
    ErrorMetadata::builder().code(code).message(message).build()
}

fn adapter(rules: &[&Rule]) -> (AwsEc2, Metrics) {
    let client: Client = mock_client!(aws_sdk_ec2, RuleMode::Sequential, rules);
    let metrics = Metrics::new();
    (
        AwsEc2::new(client, metrics.clone(), RateLimiter::unlimited()),
        metrics,
    )
}

fn new_eni() -> NewEni {
    NewEni {
        subnet_id: "subnet-00000001".into(),
        security_groups: vec!["sg-00000001".into()],
        description: "d".into(),
        tags: Default::default(),
        client_token: "t".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn missing_subnet_is_not_found() {
    let rule = mock!(Client::create_network_interface).then_error(|| {
        CreateNetworkInterfaceError::generic(meta(
            "InvalidSubnetID.NotFound",
            "The subnet ID 'subnet-00000001' does not exist",
        ))
    });
    let (ec2, _) = adapter(&[&rule]);
    let err = ec2.create_eni(new_eni()).await.expect_err("fails");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert_eq!(err.operation, "CreateNetworkInterface");
    assert!(err.to_string().contains("subnet-00000001"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn deleting_an_attached_eni_is_in_use() {
    let rule = mock!(Client::delete_network_interface).then_error(|| {
        DeleteNetworkInterfaceError::generic(meta(
            "InvalidNetworkInterface.InUse",
            "Interface: [eni-1] in use.",
        ))
    });
    let (ec2, _) = adapter(&[&rule]);
    let err = ec2.delete_eni("eni-1".into()).await.expect_err("fails");
    assert_eq!(err.kind, ErrorKind::InUse);
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn occupied_device_index_and_attachment_limit() {
    let index = mock!(Client::attach_network_interface).then_error(|| {
        AttachNetworkInterfaceError::generic(meta(
            "InvalidParameterValue",
            "Instance 'i-1' already has an interface attached at device index '2'.",
        ))
    });
    let limit = mock!(Client::attach_network_interface).then_error(|| {
        AttachNetworkInterfaceError::generic(meta(
            "AttachmentLimitExceeded",
            "Interface count 4 exceeds the limit for m5.large",
        ))
    });
    let (ec2, metrics) = adapter(&[&index, &limit]);
    let err = ec2
        .attach_eni("eni-1".into(), "i-1".into(), 2, 0)
        .await
        .expect_err("index in use");
    assert_eq!(err.kind, ErrorKind::DeviceIndexInUse);
    let err = ec2
        .attach_eni("eni-1".into(), "i-1".into(), 3, 0)
        .await
        .expect_err("limit");
    assert_eq!(err.kind, ErrorKind::AttachmentLimit);
    // Neither is retried: one request each.
    assert_eq!(metrics.ec2_call_count("AttachNetworkInterface"), 2);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_retried_with_backoff_until_it_succeeds() {
    let throttled = || {
        mock!(Client::attach_network_interface).then_error(|| {
            AttachNetworkInterfaceError::generic(meta(
                "RequestLimitExceeded",
                "Request limit exceeded.",
            ))
        })
    };
    let ok = mock!(Client::attach_network_interface).then_output(|| {
        AttachNetworkInterfaceOutput::builder()
            .attachment_id("eni-attach-1")
            .build()
    });
    let (t1, t2, t3) = (throttled(), throttled(), throttled());
    let (ec2, metrics) = adapter(&[&t1, &t2, &t3, &ok]);
    let id = ec2
        .attach_eni("eni-1".into(), "i-1".into(), 1, 0)
        .await
        .expect("succeeds after retries");
    assert_eq!(id, "eni-attach-1");
    let text = metrics.encode();
    assert!(
        text.contains(r#"eni_controller_ec2_calls_total{operation="AttachNetworkInterface",result="throttled"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"eni_controller_ec2_calls_total{operation="AttachNetworkInterface",result="ok"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn persistent_throttling_surfaces_after_bounded_retries() {
    let throttled = mock!(Client::describe_network_interfaces)
        .sequence()
        .error(|| {
            DescribeNetworkInterfacesError::generic(meta("RequestLimitExceeded", "slow down"))
        })
        .repeatedly()
        .build();
    let (ec2, metrics) = adapter(&[&throttled]);
    let err = ec2
        .describe_enis(eni_controller::ec2::EniQuery::Ids(vec!["eni-1".into()]))
        .await
        .expect_err("gives up");
    assert_eq!(err.kind, ErrorKind::Throttled);
    assert!(err.is_retryable());
    assert_eq!(metrics.ec2_call_count("DescribeNetworkInterfaces"), 31);
}
