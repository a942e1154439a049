//! Shared set-up for controller integration tests: a fresh kube-apiserver and moto per
//! test (each test runs its own controller, and controllers watch every NodeENI), a VPC
//! with subnets, security groups and instances in moto, Node objects pointing at them,
//! and the controller running in-process against both.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use clap::Parser;
use eni_api::NodeENI;
use eni_controller::config::Cli;
use eni_controller::ec2::aws::AwsEc2;
use eni_controller::metrics::{Metrics, ResultLabels};
use eni_controller::ratelimit::RateLimiter;
use eni_testkit::faults::{FaultConfig, FaultProxy};
use eni_testkit::{ApiServer, Child, Moto, eventually};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

pub const CLUSTER: &str = "it-cluster";
pub const AZ: &str = "us-east-1a";

/// One test's world.
pub struct World {
    pub api: ApiServer,
    pub moto: Moto,
    pub kube: Client,
    pub ec2: aws_sdk_ec2::Client,
    pub vpc: String,
    /// Subnets by Name tag.
    pub subnets: BTreeMap<String, String>,
    /// Security groups by group name.
    pub groups: BTreeMap<String, String>,
    pub metrics: Metrics,
    /// The EC2 fault layer in front of moto, once started.
    pub faults: Option<FaultProxy>,
    controller: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }
}

pub fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    eni_testkit::ec2_client(endpoint)
}

fn tag_spec(kind: ResourceType, name: &str) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .tags(Tag::builder().key("Name").value(name).build())
        .build()
}

impl World {
    /// apiserver + CRD, moto with a VPC, subnets `net-a`, `net-b` (10.0.1/24, 10.0.2/24) and
    /// `other-zone` (in us-east-1b), security groups `multus-a`, `multus-b`.
    pub async fn new() -> World {
        let (api, moto) = tokio::join!(ApiServer::start(), Moto::start());
        let api = api.expect("kube-apiserver");
        let moto = moto.expect("moto");
        let kube = api
            .install_crd(&eni_api::crd())
            .await
            .expect("install the CRD");
        let ec2 = ec2_client(&moto.endpoint);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .expect("vpc")
            .vpc()
            .and_then(|v| v.vpc_id())
            .expect("vpc id")
            .to_string();
        let mut subnets = BTreeMap::new();
        for (name, cidr, az) in [
            ("net-a", "10.0.1.0/24", AZ),
            ("net-b", "10.0.2.0/24", AZ),
            ("other-zone", "10.0.3.0/24", "us-east-1b"),
        ] {
            let id = ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(cidr)
                .availability_zone(az)
                .tag_specifications(tag_spec(ResourceType::Subnet, name))
                .send()
                .await
                .expect("subnet")
                .subnet()
                .and_then(|s| s.subnet_id())
                .expect("subnet id")
                .to_string();
            subnets.insert(name.to_string(), id);
        }
        let mut groups = BTreeMap::new();
        for name in ["multus-a", "multus-b"] {
            let id = ec2
                .create_security_group()
                .vpc_id(&vpc)
                .group_name(name)
                .description(name)
                .send()
                .await
                .expect("security group")
                .group_id()
                .expect("group id")
                .to_string();
            groups.insert(name.to_string(), id);
        }
        World {
            api,
            moto,
            kube,
            ec2,
            vpc,
            subnets,
            groups,
            metrics: Metrics::new(),
            faults: None,
            controller: None,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Puts the EC2 fault layer in front of moto; controllers started afterwards use it.
    pub async fn start_faults(&mut self, config: FaultConfig) {
        self.faults = Some(
            FaultProxy::start(&self.moto.endpoint, config)
                .await
                .expect("fault proxy"),
        );
    }

    /// The EC2 endpoint controllers talk to.
    pub fn controller_endpoint(&self) -> String {
        match &self.faults {
            Some(f) => f.endpoint.clone(),
            None => self.moto.endpoint.clone(),
        }
    }

    /// Starts the real `eni-controller` binary (for crash tests) with extra flags; its
    /// log goes to `<tempdir>/controller-<n>.log`.
    pub fn spawn_controller(&self, n: usize, extra: &[&str]) -> Child {
        let mut args: Vec<String> = [
            "AWS_ACCESS_KEY_ID=testing",
            "AWS_SECRET_ACCESS_KEY=testing",
            "AWS_REGION=us-east-1",
            "AWS_EC2_METADATA_DISABLED=true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("KUBECONFIG={}", self.api.kubeconfig.display()));
        args.push(env!("CARGO_BIN_EXE_eni-controller").to_string());
        for a in [
            "--cluster-name",
            CLUSTER,
            "--leader-elect=false",
            "--metrics-addr=127.0.0.1:0",
            "--in-flight-poll-interval=200ms",
            "--log-level=info,eni_controller=debug",
        ] {
            args.push(a.to_string());
        }
        args.push(format!("--ec2-endpoint={}", self.controller_endpoint()));
        args.extend(extra.iter().map(|s| s.to_string()));
        Child::spawn(
            "eni-controller",
            std::path::Path::new("/usr/bin/env"),
            &args,
            &self.dir.path().join(format!("controller-{n}.log")),
        )
        .expect("spawn eni-controller")
    }

    /// Launches an instance in `net-a` and creates a Node pointing at it.
    pub async fn node(&self, name: &str, labels: &[(&str, &str)]) -> String {
        let image = self
            .ec2
            .describe_images()
            .send()
            .await
            .expect("images")
            .images()
            .first()
            .and_then(|i| i.image_id())
            .expect("an AMI")
            .to_string();
        let instance = self
            .ec2
            .run_instances()
            .image_id(image)
            .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
            .subnet_id(&self.subnets["net-a"])
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .expect("run instance")
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .expect("instance id")
            .to_string();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"providerID": format!("aws:///{AZ}/{instance}")},
        }))
        .expect("node");
        Api::<Node>::all(self.kube.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        instance
    }

    /// Starts the controller in-process with extra flags.
    pub fn start_controller(&mut self, extra: &[&str]) {
        let defaults = [
            "--leader-elect=false",
            "--resync-period=1h",
            "--in-flight-poll-interval=200ms",
        ];
        let flag = |a: &str| a.split('=').next().unwrap_or_default().to_string();
        let mut argv = vec!["eni-controller", "--cluster-name", CLUSTER];
        argv.extend(
            defaults
                .iter()
                .filter(|d| !extra.iter().any(|e| flag(e) == flag(d))),
        );
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).expect("flags").controller;
        let ec2 = AwsEc2::new(
            ec2_client(&self.controller_endpoint()),
            self.metrics.clone(),
            if self.faults.is_some() {
                eni_controller::rate_limiter(&args)
            } else {
                RateLimiter::unlimited()
            },
        );
        let kube = self.kube.clone();
        let metrics = self.metrics.clone();
        self.controller = Some(tokio::spawn(async move {
            let ready = Arc::new(AtomicBool::new(false));
            if let Err(e) =
                eni_controller::run_with(kube, ec2, args, metrics, ready, "test".into()).await
            {
                panic!("controller failed: {e}");
            }
        }));
    }

    /// Stops the in-process controller (a crash, as far as the API server and EC2 see);
    /// returns once its task is gone, so no pass of it ends (or is counted) afterwards.
    pub async fn stop_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
            // Cancelled (or already finished): either way the task has ended.
            let _ = c.await;
        }
    }

    /// Reconcile passes completed without error so far, by every controller this world
    /// ran (they share [`World::metrics`], which the metrics endpoint serves).
    pub fn reconciles_ok(&self) -> u64 {
        self.metrics
            .reconciles
            .get(&ResultLabels {
                result: "ok".into(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Waits until `more` reconcile passes beyond `since` ([`World::reconciles_ok`]) have
    /// completed: the positive event before asserting that something did not happen.
    pub async fn wait_for_reconciles(&self, since: u64, more: u64) {
        let target = since + more;
        let done = eventually(Duration::from_secs(60), || async {
            (self.reconciles_ok() >= target).then_some(())
        })
        .await;
        assert!(
            done.is_some(),
            "timed out waiting for {more} reconcile passes (at {} of {target})",
            self.reconciles_ok()
        );
    }

    pub fn nodeenis(&self) -> Api<NodeENI> {
        Api::all(self.kube.clone())
    }

    pub async fn apply_nodeeni(&self, yaml: &str) -> NodeENI {
        let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("yaml");
        let obj: NodeENI = serde_json::from_value(value).expect("NodeENI");
        self.nodeenis()
            .patch(
                &obj.name_any(),
                &PatchParams::apply("it").force(),
                &Patch::Apply(&obj),
            )
            .await
            .expect("apply NodeENI")
    }

    /// Waits until `check` holds for the NodeENI; panics with its last state if not.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&NodeENI) -> bool,
    ) -> NodeENI {
        self.wait_for_long(name, what, Duration::from_secs(60), check)
            .await
    }

    /// [`wait_for`](Self::wait_for) with a custom deadline.
    pub async fn wait_for_long(
        &self,
        name: &str,
        what: &str,
        deadline: Duration,
        check: impl Fn(&NodeENI) -> bool,
    ) -> NodeENI {
        let api = self.nodeenis();
        let found = eventually(deadline, || {
            let api = api.clone();
            let check = &check;
            async move {
                let obj = api.get(name).await.ok()?;
                check(&obj).then_some(obj)
            }
        })
        .await;
        match found {
            Some(obj) => obj,
            None => {
                let last = api.get_opt(name).await.ok().flatten();
                panic!(
                    "timed out waiting for {name}: {what}; last status: {}",
                    serde_json::to_string_pretty(&last.and_then(|o| o.status)).unwrap_or_default()
                );
            }
        }
    }

    /// ENIs in moto carrying this cluster's tag (optionally only one node's).
    pub async fn managed_enis(
        &self,
        node: Option<&str>,
    ) -> Vec<aws_sdk_ec2::types::NetworkInterface> {
        let mut req = self.ec2.describe_network_interfaces().filters(
            Filter::builder()
                .name(format!("tag:{}", eni_api::tags::CLUSTER))
                .values(CLUSTER)
                .build(),
        );
        if let Some(node) = node {
            req = req.filters(
                Filter::builder()
                    .name(format!("tag:{}", eni_api::tags::NODE))
                    .values(node)
                    .build(),
            );
        }
        req.send()
            .await
            .expect("describe ENIs")
            .network_interfaces()
            .to_vec()
    }
}

pub fn ready(obj: &NodeENI) -> bool {
    condition(obj, "Ready").is_some_and(|c| c.status == "True")
        && obj.status.as_ref().and_then(|s| s.observed_generation) == obj.metadata.generation
}

pub fn condition<'a>(
    obj: &'a NodeENI,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    obj.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}
