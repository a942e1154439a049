//! The real [`Ec2`] adapter, on the AWS SDK.
//!
//! Every request goes through [`AwsEc2::call`]: it waits for the client-side rate
//! limiter, times the request, maps errors and records metrics, so the budget and the
//! figures are right whichever method made the call.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    AttributeValue, Filter, InstanceType, NetworkInterface, NetworkInterfaceAttachmentChanges,
    ResourceType, Tag, TagSpecification,
};

use super::{
    AttachedEni, Attachment, AttachmentState, Ec2, Ec2Error, Eni, EniQuery, ErrorKind, Instance,
    InstanceLimits, LookupQuery, NewEni, SecurityGroup, Subnet,
};
use crate::lease::Fence;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;

/// Largest page EC2 serves for `DescribeNetworkInterfaces`.
const PAGE_SIZE: i32 = 1000;
/// EC2 caps the values of one filter; larger ID lists are split.
const IDS_PER_CALL: usize = 200;

/// [`Ec2`] on the AWS SDK.
#[derive(Clone, Debug)]
pub struct AwsEc2 {
    client: Client,
    metrics: Metrics,
    limiter: RateLimiter,
    fence: Fence,
}

impl AwsEc2 {
    /// Wraps an SDK client.
    pub fn new(client: Client, metrics: Metrics, limiter: RateLimiter) -> Self {
        Self {
            client,
            metrics,
            limiter,
            fence: Fence::open(),
        }
    }

    /// Starts no mutating call while `fence` is closed (this replica may not be the
    /// leader any more).
    pub fn with_fence(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Runs one EC2 action: rate limit, time, map the error, count, and retry throttling
    /// and transient failures with jittered exponential backoff, so they never surface
    /// as reconcile failures unless they persist for minutes.
    async fn call<T, E, R, F, Fut>(
        &self,
        operation: &'static str,
        mut request: F,
    ) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let mut throttle_backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(20))
            .with_jitter()
            .with_max_times(30)
            .build();
        let mut transient_backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_max_times(4)
            .build();
        let mutating = !operation.starts_with("Describe");
        loop {
            self.limiter.acquire(operation, &self.metrics).await;
            if mutating && !self.fence.allows() {
                self.metrics
                    .ec2_call(operation, ErrorKind::NotLeader.as_str(), Duration::ZERO);
                return Err(Ec2Error::new(
                    operation,
                    ErrorKind::NotLeader,
                    "not sent: this replica may no longer hold the leader lease",
                ));
            }
            let start = Instant::now();
            let result = request()
                .await
                .map_err(|e| Ec2Error::from_sdk(operation, e));
            let label = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind.as_str(),
            };
            self.metrics.ec2_call(operation, label, start.elapsed());
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            self.limiter.on_error(operation, err.kind);
            let delay = match err.kind {
                ErrorKind::Throttled => throttle_backoff.next(),
                ErrorKind::Transient => transient_backoff.next(),
                _ => None,
            };
            match delay {
                Some(d) => {
                    tracing::debug!(operation, error = %err, delay = ?d, "retrying EC2 call");
                    tokio::time::sleep(d).await;
                }
                None => return Err(err),
            }
        }
    }
}

fn filter(name: &str, values: impl IntoIterator<Item = String>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().collect()))
        .build()
}

fn tags_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn eni_from(ni: &NetworkInterface) -> Option<Eni> {
    let mut security_groups: Vec<String> = ni
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_string))
        .collect();
    security_groups.sort();
    let attachment = ni.attachment().and_then(|a| {
        Some(Attachment {
            id: a.attachment_id()?.to_string(),
            instance_id: a.instance_id().unwrap_or_default().to_string(),
            device_index: a.device_index().unwrap_or_default(),
            network_card_index: a.network_card_index().unwrap_or_default(),
            state: AttachmentState::parse(a.status().map(|s| s.as_str()).unwrap_or("attached")),
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        })
    });
    // A detached attachment is history, not a relationship.
    let attachment = attachment.filter(|a| a.state != AttachmentState::Detached);
    Some(Eni {
        id: ni.network_interface_id()?.to_string(),
        subnet_id: ni.subnet_id().unwrap_or_default().to_string(),
        mac_address: ni.mac_address().map(str::to_string),
        private_ip: ni.private_ip_address().map(str::to_string),
        status: ni
            .status()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        security_groups,
        description: ni.description().unwrap_or_default().to_string(),
        tags: tags_map(ni.tag_set()),
        attachment,
        secondary_ips: {
            let mut v: Vec<String> = ni
                .private_ip_addresses()
                .iter()
                .filter(|a| a.primary() != Some(true))
                .filter_map(|a| a.private_ip_address().map(str::to_string))
                .filter(|a| Some(a.as_str()) != ni.private_ip_address())
                .collect();
            v.sort();
            v.dedup();
            v
        },
        ipv4_prefixes: {
            let mut v: Vec<String> = ni
                .ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix().map(str::to_string))
                .collect();
            v.sort();
            v.dedup();
            v
        },
    })
}

impl Ec2 for AwsEc2 {
    async fn describe_enis(&self, query: EniQuery) -> Result<Vec<Eni>, Ec2Error> {
        let mut out = Vec::new();
        match query {
            EniQuery::Tag(key, value) => {
                let mut token = None;
                loop {
                    let req = self
                        .client
                        .describe_network_interfaces()
                        .filters(filter(&format!("tag:{key}"), [value.clone()]))
                        .max_results(PAGE_SIZE)
                        .set_next_token(token.take());
                    let page = self
                        .call("DescribeNetworkInterfaces", || req.clone().send())
                        .await?;
                    out.extend(page.network_interfaces().iter().filter_map(eni_from));
                    match page.next_token() {
                        Some(t) if !t.is_empty() => token = Some(t.to_string()),
                        _ => break,
                    }
                }
            }
            EniQuery::Ids(ids) => {
                for chunk in ids.chunks(IDS_PER_CALL) {
                    // A filter (unlike NetworkInterfaceIds) does not fail on missing IDs.
                    let req = self
                        .client
                        .describe_network_interfaces()
                        .filters(filter("network-interface-id", chunk.to_vec()));
                    let page = self
                        .call("DescribeNetworkInterfaces", || req.clone().send())
                        .await?;
                    out.extend(page.network_interfaces().iter().filter_map(eni_from));
                }
            }
        }
        Ok(out)
    }

    async fn describe_instances(&self, ids: Vec<String>) -> Result<Vec<Instance>, Ec2Error> {
        let mut out = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            let req = self
                .client
                .describe_instances()
                .filters(filter("instance-id", chunk.to_vec()));
            let resp = self
                .call("DescribeInstances", || req.clone().send())
                .await?;
            for inst in resp.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = inst.instance_id() else {
                    continue;
                };
                let enis = inst
                    .network_interfaces()
                    .iter()
                    .filter_map(|ni| {
                        let a = ni.attachment()?;
                        Some(AttachedEni {
                            eni_id: ni.network_interface_id()?.to_string(),
                            device_index: a.device_index()?,
                            network_card_index: a.network_card_index().unwrap_or_default(),
                            description: ni.description().unwrap_or_default().to_string(),
                            nodeeni: None,
                        })
                    })
                    .collect();
                out.push(Instance {
                    id: id.to_string(),
                    instance_type: inst
                        .instance_type()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                    vpc_id: inst.vpc_id().unwrap_or_default().to_string(),
                    availability_zone: inst
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or_default()
                        .to_string(),
                    state: inst
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    enis,
                });
            }
        }
        Ok(out)
    }

    async fn describe_instance_types(
        &self,
        types: Vec<String>,
    ) -> Result<BTreeMap<String, InstanceLimits>, Ec2Error> {
        let req = self
            .client
            .describe_instance_types()
            .set_instance_types(Some(
                types
                    .iter()
                    .map(|t| InstanceType::from(t.as_str()))
                    .collect(),
            ));
        let resp = self
            .call("DescribeInstanceTypes", || req.clone().send())
            .await?;
        Ok(resp
            .instance_types()
            .iter()
            .filter_map(|t| {
                let name = t.instance_type()?.as_str().to_string();
                let net = t.network_info()?;
                let cards = net
                    .network_cards()
                    .iter()
                    .filter_map(|c| {
                        Some((c.network_card_index()?, c.maximum_network_interfaces()?))
                    })
                    .collect();
                Some((
                    name,
                    InstanceLimits {
                        max_enis: net.maximum_network_interfaces()?,
                        cards,
                        ipv4_per_interface: net.ipv4_addresses_per_interface(),
                        nitro: t.hypervisor().map(|h| h.as_str() == "nitro"),
                    },
                ))
            })
            .collect())
    }

    async fn describe_subnets(&self, query: LookupQuery) -> Result<Vec<Subnet>, Ec2Error> {
        let req = self.client.describe_subnets();
        let req = match query {
            LookupQuery::Ids(ids) => req.set_subnet_ids(Some(ids)),
            LookupQuery::NameTags { vpc_id, names } | LookupQuery::GroupNames { vpc_id, names } => {
                req.filters(filter("vpc-id", [vpc_id]))
                    .filters(filter("tag:Name", names))
            }
        };
        let resp = self.call("DescribeSubnets", || req.clone().send()).await?;
        Ok(resp
            .subnets()
            .iter()
            .filter_map(|s| {
                Some(Subnet {
                    id: s.subnet_id()?.to_string(),
                    vpc_id: s.vpc_id().unwrap_or_default().to_string(),
                    availability_zone: s.availability_zone().unwrap_or_default().to_string(),
                    cidr: s.cidr_block().unwrap_or_default().to_string(),
                    name: tags_map(s.tags()).remove("Name"),
                })
            })
            .collect())
    }

    async fn describe_security_groups(
        &self,
        query: LookupQuery,
    ) -> Result<Vec<SecurityGroup>, Ec2Error> {
        let req = self.client.describe_security_groups();
        let req = match query {
            LookupQuery::Ids(ids) => req.set_group_ids(Some(ids)),
            LookupQuery::NameTags { vpc_id, names } => req
                .filters(filter("vpc-id", [vpc_id]))
                .filters(filter("tag:Name", names)),
            LookupQuery::GroupNames { vpc_id, names } => req
                .filters(filter("vpc-id", [vpc_id]))
                .filters(filter("group-name", names)),
        };
        let resp = self
            .call("DescribeSecurityGroups", || req.clone().send())
            .await?;
        Ok(resp
            .security_groups()
            .iter()
            .filter_map(|g| {
                Some(SecurityGroup {
                    id: g.group_id()?.to_string(),
                    name: g.group_name().unwrap_or_default().to_string(),
                    name_tag: tags_map(g.tags()).remove("Name"),
                    vpc_id: g.vpc_id().unwrap_or_default().to_string(),
                })
            })
            .collect())
    }

    async fn create_eni(&self, eni: NewEni) -> Result<Eni, Ec2Error> {
        let tags = eni
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let req = self
            .client
            .create_network_interface()
            .subnet_id(&eni.subnet_id)
            .set_groups(Some(eni.security_groups.clone()))
            .description(&eni.description)
            .client_token(&eni.client_token)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::NetworkInterface)
                    .set_tags(Some(tags))
                    .build(),
            );
        let resp = self
            .call("CreateNetworkInterface", || req.clone().send())
            .await?;
        resp.network_interface().and_then(eni_from).ok_or_else(|| {
            Ec2Error::new(
                "CreateNetworkInterface",
                ErrorKind::Other,
                "EC2 answered without a network interface",
            )
        })
    }

    async fn attach_eni(
        &self,
        eni_id: String,
        instance_id: String,
        device_index: i32,
        network_card_index: i32,
    ) -> Result<String, Ec2Error> {
        let mut req = self
            .client
            .attach_network_interface()
            .network_interface_id(eni_id)
            .instance_id(instance_id)
            .device_index(device_index);
        // Only send the card index where it matters: single-card instances reject nothing,
        // but older emulators do not know the parameter.
        if network_card_index != 0 {
            req = req.network_card_index(network_card_index);
        }
        let resp = self
            .call("AttachNetworkInterface", || req.clone().send())
            .await?;
        resp.attachment_id().map(str::to_string).ok_or_else(|| {
            Ec2Error::new(
                "AttachNetworkInterface",
                ErrorKind::Other,
                "EC2 answered without an attachment ID",
            )
        })
    }

    async fn set_delete_on_termination(
        &self,
        eni_id: String,
        attachment_id: String,
        delete: bool,
    ) -> Result<(), Ec2Error> {
        let req = self
            .client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment_id)
                    .delete_on_termination(delete)
                    .build(),
            );
        self.call("ModifyNetworkInterfaceAttribute", || req.clone().send())
            .await
            .map(drop)
    }

    async fn set_security_groups(
        &self,
        eni_id: String,
        groups: Vec<String>,
    ) -> Result<(), Ec2Error> {
        let req = self
            .client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .set_groups(Some(groups));
        self.call("ModifyNetworkInterfaceAttribute", || req.clone().send())
            .await
            .map(drop)
    }

    async fn set_description(&self, eni_id: String, description: String) -> Result<(), Ec2Error> {
        let req = self
            .client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .description(AttributeValue::builder().value(description).build());
        self.call("ModifyNetworkInterfaceAttribute", || req.clone().send())
            .await
            .map(drop)
    }

    async fn detach_eni(&self, attachment_id: String, force: bool) -> Result<(), Ec2Error> {
        let req = self
            .client
            .detach_network_interface()
            .attachment_id(attachment_id)
            .force(force);
        self.call("DetachNetworkInterface", || req.clone().send())
            .await
            .map(drop)
    }

    async fn delete_eni(&self, eni_id: String) -> Result<(), Ec2Error> {
        let req = self
            .client
            .delete_network_interface()
            .network_interface_id(eni_id);
        self.call("DeleteNetworkInterface", || req.clone().send())
            .await
            .map(drop)
    }

    async fn assign_ips(
        &self,
        eni_id: String,
        count: i32,
        prefixes: bool,
    ) -> Result<Vec<String>, Ec2Error> {
        let mut req = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id);
        req = if prefixes {
            req.ipv4_prefix_count(count)
        } else {
            req.secondary_private_ip_address_count(count)
        };
        let resp = self
            .call("AssignPrivateIpAddresses", || req.clone().send())
            .await?;
        let mut out: Vec<String> = if prefixes {
            resp.assigned_ipv4_prefixes()
                .iter()
                .filter_map(|p| p.ipv4_prefix().map(str::to_string))
                .collect()
        } else {
            resp.assigned_private_ip_addresses()
                .iter()
                .filter_map(|a| a.private_ip_address().map(str::to_string))
                .collect()
        };
        out.sort();
        Ok(out)
    }

    async fn unassign_ips(
        &self,
        eni_id: String,
        units: Vec<String>,
        prefixes: bool,
    ) -> Result<(), Ec2Error> {
        let mut req = self
            .client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id);
        req = if prefixes {
            req.set_ipv4_prefixes(Some(units))
        } else {
            req.set_private_ip_addresses(Some(units))
        };
        self.call("UnassignPrivateIpAddresses", || req.clone().send())
            .await
            .map(drop)
    }

    async fn tag_eni(
        &self,
        eni_id: String,
        tags: BTreeMap<String, String>,
    ) -> Result<(), Ec2Error> {
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let req = self
            .client
            .create_tags()
            .resources(eni_id)
            .set_tags(Some(tags));
        self.call("CreateTags", || req.clone().send())
            .await
            .map(drop)
    }
}
