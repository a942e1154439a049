//! A stand-in for the Amazon VPC CNI's ipamd as far as ENIs go: on the instances it is
//! given, it keeps a number of its own ENIs attached, each at the lowest free device
//! index, the way ipamd grows its warm pool (`WARM_ENI_TARGET`). Its ENIs look like the
//! real ones: description `aws-K8S-<instance-id>`, tags
//! `node.k8s.amazonaws.com/instance_id` and `cluster.k8s.amazonaws.com/name`.
//!
//! It talks to EC2 through whatever endpoint it is given (the fault layer, so an occupied
//! index or the instance's ENI limit is refused as real EC2 would) and simply tries the
//! next free index again later when it loses a race. It never touches ENIs it did not
//! create. Runs until dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use tokio::task::JoinHandle;

/// Description prefix of ipamd's ENIs.
pub const DESCRIPTION_PREFIX: &str = "aws-K8S-";

/// One ENI the actor attached: (instance, ENI, device index).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attached {
    /// The instance.
    pub instance_id: String,
    /// The ENI.
    pub eni_id: String,
    /// Where it sits.
    pub device_index: i32,
}

/// What the actor did, for assertions.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// ENIs it attached.
    pub attached: Vec<Attached>,
    /// Attach attempts EC2 refused (index taken meanwhile, instance full).
    pub refused: u64,
}

/// A running ipamd stand-in.
#[derive(Debug)]
pub struct Ipamd {
    record: Arc<Mutex<Record>>,
    task: JoinHandle<()>,
}

impl Drop for Ipamd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Ipamd {
    /// Starts keeping `want[instance]` ENIs of its own on each instance, created in
    /// `subnet`, looking every `period`.
    pub fn start(
        ec2: Client,
        cluster: &str,
        subnet: &str,
        want: BTreeMap<String, usize>,
        period: Duration,
    ) -> Self {
        let record = Arc::new(Mutex::new(Record::default()));
        let rec = record.clone();
        let cluster = cluster.to_string();
        let subnet = subnet.to_string();
        let task = tokio::spawn(async move {
            // ENIs created but not attached yet (lost a race): reused next round.
            let mut spare: BTreeMap<String, String> = BTreeMap::new();
            loop {
                for (instance, n) in &want {
                    let have = lock(&rec)
                        .attached
                        .iter()
                        .filter(|a| &a.instance_id == instance)
                        .count();
                    if have >= *n {
                        continue;
                    }
                    let Some(index) = lowest_free_index(&ec2, instance).await else {
                        continue;
                    };
                    let eni = match spare.remove(instance) {
                        Some(e) => e,
                        None => match create(&ec2, &cluster, &subnet, instance).await {
                            Some(e) => e,
                            None => continue,
                        },
                    };
                    let ok = ec2
                        .attach_network_interface()
                        .network_interface_id(&eni)
                        .instance_id(instance)
                        .device_index(index)
                        .send()
                        .await
                        .is_ok();
                    let mut r = lock(&rec);
                    if ok {
                        r.attached.push(Attached {
                            instance_id: instance.clone(),
                            eni_id: eni,
                            device_index: index,
                        });
                    } else {
                        r.refused += 1;
                        spare.insert(instance.clone(), eni);
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Self { record, task }
    }

    /// What it did so far.
    pub fn record(&self) -> Record {
        lock(&self.record).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn create(ec2: &Client, cluster: &str, subnet: &str, instance: &str) -> Option<String> {
    let tags = TagSpecification::builder()
        .resource_type(ResourceType::NetworkInterface)
        .tags(
            Tag::builder()
                .key("node.k8s.amazonaws.com/instance_id")
                .value(instance)
                .build(),
        )
        .tags(
            Tag::builder()
                .key("cluster.k8s.amazonaws.com/name")
                .value(cluster)
                .build(),
        )
        .build();
    ec2.create_network_interface()
        .subnet_id(subnet)
        .description(format!("{DESCRIPTION_PREFIX}{instance}"))
        .tag_specifications(tags)
        .send()
        .await
        .ok()?
        .network_interface()?
        .network_interface_id()
        .map(str::to_string)
}

/// The lowest device index (from 1) no ENI of the instance occupies.
async fn lowest_free_index(ec2: &Client, instance: &str) -> Option<i32> {
    let resp = ec2
        .describe_network_interfaces()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(instance)
                .build(),
        )
        .send()
        .await
        .ok()?;
    let used: BTreeSet<i32> = resp
        .network_interfaces()
        .iter()
        .filter_map(|n| n.attachment()?.device_index())
        .collect();
    (1..64).find(|i| !used.contains(i))
}
