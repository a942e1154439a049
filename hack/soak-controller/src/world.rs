//! The soak's world: real etcd + kube-apiserver, moto behind the EC2 fault layer, the
//! real `eni-controller` binary as child processes (two replicas with leader election),
//! and the model of what the harness did to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{
    Filter, InstanceType, NetworkInterface, ResourceType, Tag, TagSpecification,
};
use eni_api::NodeENI;
use eni_testkit::faults::{FaultConfig, FaultProxy, LatencyConfig};
use eni_testkit::{ApiServer, Child, Moto, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use tracing::{debug, info, warn};

use crate::Error;
use crate::link::ApiLink;
use crate::ops::{self, GROUPS, NODEENIS, NODES, REPLICAS, SUBNETS, Spec};

/// The controller's `--cluster-name`.
pub const CLUSTER: &str = "soak";
/// Zone of every node and subnet.
pub const AZ: &str = "us-east-1a";
/// Namespace of the leader-election Lease.
pub const LEASE_NAMESPACE: &str = "eni-controller-system";
/// Name of the leader-election Lease (the controller's default).
pub const LEASE_NAME: &str = "aws-multi-eni-controller";
/// Finalizer the harness puts on Nodes it drains.
pub const DRAIN_FINALIZER: &str = "soak.k8s.aws/drain";
/// Instance type of every node (15 network interfaces: room for all bands).
pub const INSTANCE_TYPE: InstanceType = InstanceType::M524xlarge;

/// Controller timing flags, short so quiet periods are short.
#[derive(Clone, Debug)]
pub struct ControllerTiming {
    /// `--resync-period`.
    pub resync: Duration,
    /// `--detachment-timeout`.
    pub detach_timeout: Duration,
    /// `--orphan-grace-period`.
    pub orphan_grace: Duration,
}

/// A Node in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelNode {
    /// Its EC2 instance.
    pub instance_id: String,
    /// NodeENIs whose label it carries.
    pub labels: BTreeSet<u8>,
    /// Deleted while holding the drain finalizer: has a deletionTimestamp.
    pub draining: bool,
}

/// A foreign ENI: created and attached by "someone else", never to be touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// ENI ID.
    pub id: String,
    /// Attachment ID (`None`: left available).
    pub attachment_id: Option<String>,
    /// Instance it is attached to.
    pub instance_id: Option<String>,
    /// Device index.
    pub device_index: Option<i32>,
    /// Security groups, sorted.
    pub groups: Vec<String>,
    /// Description.
    pub description: String,
    /// Tags, as created.
    pub tags: BTreeMap<String, String>,
}

/// What the harness believes the world should look like.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Nodes that exist (possibly draining).
    pub nodes: BTreeMap<u8, ModelNode>,
    /// NodeENIs that exist or will once a pending re-create goes through.
    pub nodeenis: BTreeMap<u8, Spec>,
    /// NodeENIs deleted for a re-create, to be created again once gone.
    pub pending_recreate: BTreeSet<u8>,
    /// Foreign ENIs.
    pub foreign: Vec<Foreign>,
    /// Replicas the model wants running.
    pub replicas: BTreeSet<u8>,
    /// Edits (and creates) per NodeENI over the run: each may cost every ENI of it a
    /// modify, so the per-ENI call budget grows with them.
    pub edits: BTreeMap<u8, u32>,
    /// Out-of-band detaches per ENI (each costs a re-attach and a DeleteOnTermination).
    pub oob_detaches: BTreeMap<String, u32>,
    /// Every cluster ENI ever seen, with its NodeENI tag (for budgets of deleted ENIs).
    pub seen_enis: BTreeMap<String, String>,
    /// Replica processes cut off from the API server: (EC2 access key of that process,
    /// when it was cut, in ms since the Unix epoch).
    pub cut: Vec<(String, u64)>,
}

/// The running world.
pub struct World {
    /// kube-apiserver + etcd.
    pub api: ApiServer,
    /// moto.
    pub moto: Moto,
    /// The fault layer in front of moto; the controllers talk to it.
    pub faults: FaultProxy,
    /// Admin client.
    pub kube: Client,
    /// EC2 client straight to moto (ground truth, out-of-band changes).
    pub ec2: aws_sdk_ec2::Client,
    /// EC2 client through the fault layer (foreign attaches get EC2's index check).
    pub ec2_faulty: aws_sdk_ec2::Client,
    /// Subnets (name, id), pool order.
    pub subnets: Vec<(String, String)>,
    /// Security groups (name, id), pool order.
    pub groups: Vec<(String, String)>,
    /// The model.
    pub model: Model,
    image: String,
    controller: PathBuf,
    timing: ControllerTiming,
    replicas: BTreeMap<u8, (Child, ApiLink, String)>,
    /// Replicas cut off from the API server, left running until the quiet period ends.
    cut_off: Vec<(Child, ApiLink)>,
    starts: usize,
    /// Unexpected controller exits seen (the process died without the harness killing it).
    pub unexpected_exits: Vec<String>,
    log_dir: PathBuf,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("api", &self.api.url)
            .field("moto", &self.moto.endpoint)
            .field("faults", &self.faults.endpoint)
            .field("model", &self.model)
            .field("log_dir", &self.log_dir)
            .finish_non_exhaustive()
    }
}

/// The fault-layer settings outside fault windows: real-EC2 emulation (throttling at EC2's
/// buckets, index and limit checks, in-use deletes, client tokens) with short
/// attaching/detaching windows so attaches and detaches are asynchronous.
pub fn base_faults() -> FaultConfig {
    FaultConfig {
        attach_delay_ms: 300,
        detach_delay_ms: 300,
        ..FaultConfig::default()
    }
}

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

fn ec2_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Ec2(format!("{what}: {e}"))
}

/// Whether an out-of-band change took effect: `false` when it lost a race with the
/// controller (the attachment or ENI it listed a moment ago is already gone or on its
/// way: `*.NotFound`, `IncorrectState`, `InvalidNetworkInterface.InUse`), an error for
/// anything else.
fn applied<T, E>(
    res: Result<T, aws_sdk_ec2::error::SdkError<E>>,
    what: &str,
    eni: &str,
) -> Result<bool, Error>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let Err(e) = res else {
        return Ok(true);
    };
    let lost_race = e
        .as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| {
            c.ends_with(".NotFound")
                || c == "IncorrectState"
                || c == "InvalidNetworkInterface.InUse"
        });
    if lost_race {
        info!(%eni, error = %DisplayErrorContext(&e), "{what} lost a race with the controller");
        Ok(false)
    } else {
        Err(ec2_err(what, DisplayErrorContext(e)))
    }
}

impl World {
    /// Starts everything but the controllers.
    pub async fn start(
        controller: &Path,
        timing: ControllerTiming,
        log_dir: PathBuf,
    ) -> Result<World, Error> {
        std::fs::create_dir_all(&log_dir).map_err(|source| Error::Io {
            what: format!("create {}", log_dir.display()),
            source,
        })?;
        let (api, moto) = tokio::join!(ApiServer::start(), Moto::start());
        let (api, moto) = (api?, moto?);
        let kube = api.install_crd(&eni_api::crd()).await?;
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}
        }))?;
        Api::<Namespace>::all(kube.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let ec2 = eni_testkit::ec2_client(&moto.endpoint);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .map_err(|e| ec2_err("create vpc", e))?
            .vpc()
            .and_then(|v| v.vpc_id())
            .map(String::from)
            .ok_or_else(|| Error::Ec2("no vpc id".into()))?;
        let mut subnets = Vec::new();
        for i in 0..SUBNETS {
            let name = format!("soak-net-{i}");
            let id = ec2
                .create_subnet()
                .vpc_id(&vpc)
                .cidr_block(format!("10.0.{}.0/24", i + 1))
                .availability_zone(AZ)
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Subnet)
                        .tags(tag("Name", &name))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| ec2_err("create subnet", e))?
                .subnet()
                .and_then(|s| s.subnet_id())
                .map(String::from)
                .ok_or_else(|| Error::Ec2("no subnet id".into()))?;
            subnets.push((name, id));
        }
        let mut groups = Vec::new();
        for i in 0..GROUPS {
            let name = format!("soak-sg-{i}");
            let id = ec2
                .create_security_group()
                .vpc_id(&vpc)
                .group_name(&name)
                .description(&name)
                .send()
                .await
                .map_err(|e| ec2_err("create security group", e))?
                .group_id()
                .map(String::from)
                .ok_or_else(|| Error::Ec2("no group id".into()))?;
            groups.push((name, id));
        }
        let image = ec2
            .describe_images()
            .send()
            .await
            .map_err(|e| ec2_err("describe images", e))?
            .images()
            .first()
            .and_then(|i| i.image_id())
            .map(String::from)
            .ok_or_else(|| Error::Ec2("moto has no AMI".into()))?;
        let faults = FaultProxy::start(&moto.endpoint, base_faults())
            .await
            .map_err(|e| Error::Ec2(format!("fault layer: {e}")))?;
        let ec2_faulty = eni_testkit::ec2_client(&faults.endpoint);
        let mut world = World {
            api,
            moto,
            faults,
            kube,
            ec2,
            ec2_faulty,
            subnets,
            groups,
            model: Model::default(),
            image,
            controller: controller.to_path_buf(),
            timing,
            replicas: BTreeMap::new(),
            cut_off: Vec::new(),
            starts: 0,
            unexpected_exits: Vec::new(),
            log_dir,
        };
        // Someone else's ENIs, left available in our subnet: the sweeper must leave them.
        // The second is a twin cluster's: same cluster name, another cluster identity,
        // tagged for a slot the soak may want (issue 12, defect 6).
        let subnet = world.subnets[0].1.clone();
        let plain = world
            .create_foreign_eni(&subnet, "available foreign ENI", &[])
            .await?;
        let twin = world
            .create_foreign_eni(
                &subnet,
                "twin cluster's ENI",
                &twin_tags(0, &ops::node_name(0), "i-0000000000000000", ops::band(0)),
            )
            .await?;
        for id in [plain, twin] {
            if let Some(eni) = world.describe_eni(&id).await? {
                world.model.foreign.push(foreign_of(&eni));
            }
        }
        Ok(world)
    }

    /// Directory of the controller logs.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    // ---- controllers ----

    /// Starts replica `r` (no-op if it runs). Each start gets its own EC2 access key
    /// (`replica-R-N`, so the fault layer counts its calls apart) and its own link to the
    /// API server (so it alone can be cut off).
    pub async fn start_replica(&mut self, r: u8) -> Result<(), Error> {
        if let Some((c, _, _)) = self.replicas.get_mut(&r)
            && c.running()
        {
            self.model.replicas.insert(r);
            return Ok(());
        }
        self.starts += 1;
        let key = format!("replica-{r}-{}", self.starts);
        let upstream: std::net::SocketAddr = self
            .api
            .url
            .trim_start_matches("https://")
            .parse()
            .map_err(|e| Error::Ec2(format!("API server address {}: {e}", self.api.url)))?;
        let link = ApiLink::start(upstream).await.map_err(|source| Error::Io {
            what: "start an API link".into(),
            source,
        })?;
        let admin = std::fs::read_to_string(&self.api.kubeconfig).map_err(|source| Error::Io {
            what: "read the kubeconfig".into(),
            source,
        })?;
        let kubeconfig = self.log_dir.join(format!("kubeconfig-{key}"));
        std::fs::write(
            &kubeconfig,
            admin.replace(&self.api.url, &format!("https://127.0.0.1:{}", link.port)),
        )
        .map_err(|source| Error::Io {
            what: "write a kubeconfig".into(),
            source,
        })?;
        let t = &self.timing;
        let args: Vec<String> = vec![
            format!("AWS_ACCESS_KEY_ID={key}"),
            "AWS_SECRET_ACCESS_KEY=testing".into(),
            "AWS_REGION=us-east-1".into(),
            "AWS_EC2_METADATA_DISABLED=true".into(),
            format!("KUBECONFIG={}", kubeconfig.display()),
            self.controller.display().to_string(),
            format!("--cluster-name={CLUSTER}"),
            "--leader-elect=true".into(),
            format!("--pod-name={key}"),
            format!("--leader-election-namespace={LEASE_NAMESPACE}"),
            "--metrics-addr=127.0.0.1:0".into(),
            "--in-flight-poll-interval=200ms".into(),
            format!("--resync-period={}", humantime::format_duration(t.resync)),
            format!(
                "--detachment-timeout={}",
                humantime::format_duration(t.detach_timeout)
            ),
            format!(
                "--orphan-grace-period={}",
                humantime::format_duration(t.orphan_grace)
            ),
            "--log-level=info,eni_controller=debug".into(),
            format!("--ec2-endpoint={}", self.faults.endpoint),
        ];
        let log = self.log_dir.join(format!("controller-{key}.log"));
        let child = Child::spawn(
            &format!("replica-{r}"),
            Path::new("/usr/bin/env"),
            &args,
            &log,
        )?;
        info!(replica = r, pid = child.pid(), log = %log.display(), "controller started");
        self.replicas.insert(r, (child, link, key));
        self.model.replicas.insert(r);
        Ok(())
    }

    /// Cuts replica `r` off from the API server (EC2 stays reachable). The process keeps
    /// running until [`end_cut_offs`](Self::end_cut_offs).
    pub fn cut_replica(&mut self, r: u8) {
        if let Some((child, link, key)) = self.replicas.remove(&r) {
            info!(
                replica = r,
                pid = child.pid(),
                "cut off from the API server"
            );
            link.cut();
            self.model.cut.push((key, unix_ms()));
            self.cut_off.push((child, link));
        }
        self.model.replicas.remove(&r);
    }

    /// Kills the replicas that were cut off.
    pub fn end_cut_offs(&mut self) {
        for (mut child, _link) in self.cut_off.drain(..) {
            child.kill();
        }
        self.model.cut.clear();
    }

    /// kill -9 replica `r`.
    pub fn kill_replica(&mut self, r: u8) {
        if let Some((mut c, _, _)) = self.replicas.remove(&r) {
            info!(replica = r, pid = c.pid(), "kill -9");
            c.kill();
        }
        self.model.replicas.remove(&r);
    }

    /// The replica holding the Lease, if any.
    pub async fn leader(&self) -> Option<u8> {
        let leases: Api<Lease> = Api::namespaced(self.kube.clone(), LEASE_NAMESPACE);
        let lease = leases.get_opt(LEASE_NAME).await.ok().flatten()?;
        let holder = lease.spec?.holder_identity?;
        self.replicas
            .iter()
            .find(|(_, (_, _, key))| *key == holder)
            .map(|(r, _)| *r)
    }

    /// Replicas that died on their own are noted and started again; if none runs, starts
    /// one.
    pub async fn ensure_replicas(&mut self) -> Result<(), Error> {
        let dead: Vec<u8> = self
            .replicas
            .iter_mut()
            .filter_map(|(r, (c, _, _))| (!c.running()).then_some(*r))
            .collect();
        for r in dead {
            if let Some((c, _, _)) = self.replicas.remove(&r) {
                let msg = format!("replica-{r} exited on its own (log {})", c.log().display());
                warn!("{msg}");
                self.unexpected_exits.push(msg);
            }
            if self.model.replicas.contains(&r) {
                self.model.replicas.remove(&r);
                self.start_replica(r).await?;
            }
        }
        if self.model.replicas.is_empty() {
            self.start_replica(0).await?;
        }
        Ok(())
    }

    /// Controller logs that show a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.log_dir) {
            for e in dir.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(line) = text.lines().find(|l| l.contains("panicked at")) {
                    out.push(format!("{}: {line}", e.path().display()));
                }
            }
        }
        out.sort();
        out
    }

    // ---- nodes ----

    fn nodes_api(&self) -> Api<Node> {
        Api::all(self.kube.clone())
    }

    /// Launches an instance and creates the Node.
    pub async fn create_node(&mut self, node: u8, labels: &[u8]) -> Result<(), Error> {
        let instance_id = self
            .ec2
            .run_instances()
            .image_id(&self.image)
            .instance_type(INSTANCE_TYPE)
            .subnet_id(&self.subnets[0].1)
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .map_err(|e| ec2_err("run instance", e))?
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(String::from)
            .ok_or_else(|| Error::Ec2("no instance id".into()))?;
        let labels: BTreeSet<u8> = labels.iter().copied().collect();
        let label_map: BTreeMap<String, String> = labels
            .iter()
            .map(|ne| (ops::label_key(*ne), "on".to_string()))
            .collect();
        let obj: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": ops::node_name(node), "labels": label_map},
            "spec": {"providerID": format!("aws:///{AZ}/{instance_id}")},
        }))?;
        self.nodes_api()
            .create(&PostParams::default(), &obj)
            .await?;
        self.model.nodes.insert(
            node,
            ModelNode {
                instance_id,
                labels,
                draining: false,
            },
        );
        Ok(())
    }

    /// Sets or removes NodeENI `ne`'s label on `node`.
    pub async fn set_label(&mut self, node: u8, ne: u8, on: bool) -> Result<(), Error> {
        let value = if on {
            serde_json::json!("on")
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({"metadata": {"labels": {ops::label_key(ne): value}}});
        self.nodes_api()
            .patch(
                &ops::node_name(node),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        if let Some(n) = self.model.nodes.get_mut(&node) {
            if on {
                n.labels.insert(ne);
            } else {
                n.labels.remove(&ne);
            }
        }
        Ok(())
    }

    /// Deletes the Node object (its instance keeps running).
    pub async fn delete_node(&mut self, node: u8) -> Result<(), Error> {
        ignore_not_found(
            self.nodes_api()
                .delete(&ops::node_name(node), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
        self.model.nodes.remove(&node);
        Ok(())
    }

    /// Finalizer, then delete: the Node stays with a deletionTimestamp.
    pub async fn drain_node(&mut self, node: u8) -> Result<(), Error> {
        let patch = serde_json::json!({"metadata": {"finalizers": [DRAIN_FINALIZER]}});
        let api = self.nodes_api();
        let name = ops::node_name(node);
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        api.delete(&name, &DeleteParams::default()).await?;
        if let Some(n) = self.model.nodes.get_mut(&node) {
            n.draining = true;
        }
        Ok(())
    }

    /// Removes the drain finalizer: the Node is gone.
    pub async fn release_node(&mut self, node: u8) -> Result<(), Error> {
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        ignore_not_found(
            self.nodes_api()
                .patch(
                    &ops::node_name(node),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ()),
        )?;
        self.model.nodes.remove(&node);
        Ok(())
    }

    // ---- NodeENIs ----

    /// The NodeENI API.
    pub fn nodeenis(&self) -> Api<NodeENI> {
        Api::all(self.kube.clone())
    }

    /// The NodeENI object for `spec`.
    pub fn nodeeni_object(&self, ne: u8, spec: &Spec) -> Result<NodeENI, Error> {
        let mut s = serde_json::json!({
            "nodeSelector": {ops::label_key(ne): "on"},
            "deviceIndex": spec.device_index(ne),
        });
        let subnets: Vec<&str> = spec
            .subnets
            .iter()
            .map(|i| {
                let (name, id) = &self.subnets[*i as usize];
                if spec.subnets_by_name {
                    name.as_str()
                } else {
                    id.as_str()
                }
            })
            .collect();
        s[if spec.subnets_by_name {
            "subnetNames"
        } else {
            "subnetIDs"
        }] = serde_json::json!(subnets);
        let groups: Vec<&str> = spec
            .groups
            .iter()
            .map(|i| {
                let (name, id) = &self.groups[*i as usize];
                if spec.groups_by_name {
                    name.as_str()
                } else {
                    id.as_str()
                }
            })
            .collect();
        s[if spec.groups_by_name {
            "securityGroupNames"
        } else {
            "securityGroupIDs"
        }] = serde_json::json!(groups);
        if let Some(d) = spec.description {
            s["description"] = serde_json::json!(description(d));
        }
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.aws/v1alpha1",
            "kind": "NodeENI",
            "metadata": {"name": ops::nodeeni_name(ne)},
            "spec": s,
        }))?)
    }

    /// Creates or replaces NodeENI `ne` (server-side apply, so dropped fields go).
    pub async fn apply_nodeeni(&mut self, ne: u8, spec: &Spec) -> Result<(), Error> {
        *self.model.edits.entry(ne).or_default() += 1;
        self.model.nodeenis.insert(ne, spec.clone());
        if self.model.pending_recreate.contains(&ne) {
            // Still terminating: the re-create will use this spec.
            return Ok(());
        }
        // A create right after a delete may find the old object still terminating (its
        // finalizer waits for the ENIs to go). Applying to it would only edit an object
        // about to vanish, so the create waits for it to go, like a re-create.
        let name = ops::nodeeni_name(ne);
        if self
            .nodeenis()
            .get_opt(&name)
            .await?
            .is_some_and(|o| o.metadata.deletion_timestamp.is_some())
        {
            self.model.pending_recreate.insert(ne);
            return Ok(());
        }
        let obj = self.nodeeni_object(ne, spec)?;
        self.nodeenis()
            .patch(
                &ops::nodeeni_name(ne),
                &PatchParams::apply("soak").force(),
                &Patch::Apply(&obj),
            )
            .await?;
        Ok(())
    }

    /// Deletes NodeENI `ne`.
    pub async fn delete_nodeeni(&mut self, ne: u8) -> Result<(), Error> {
        ignore_not_found(
            self.nodeenis()
                .delete(&ops::nodeeni_name(ne), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
        self.model.nodeenis.remove(&ne);
        self.model.pending_recreate.remove(&ne);
        Ok(())
    }

    /// Deletes NodeENI `ne` and creates it again with `spec` once it is gone (waits a
    /// little when a controller runs; otherwise a later step creates it).
    pub async fn recreate_nodeeni(&mut self, ne: u8, spec: &Spec) -> Result<(), Error> {
        ignore_not_found(
            self.nodeenis()
                .delete(&ops::nodeeni_name(ne), &DeleteParams::default())
                .await
                .map(|_| ()),
        )?;
        *self.model.edits.entry(ne).or_default() += 1;
        self.model.nodeenis.insert(ne, spec.clone());
        self.model.pending_recreate.insert(ne);
        if !self.model.replicas.is_empty() {
            let api = self.nodeenis();
            let name = ops::nodeeni_name(ne);
            eventually(Duration::from_secs(10), || {
                let (api, name) = (api.clone(), name.clone());
                async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
            })
            .await;
        }
        self.flush_recreates().await
    }

    /// Creates the NodeENIs waiting for a re-create whose old object is gone.
    pub async fn flush_recreates(&mut self) -> Result<(), Error> {
        for ne in self.model.pending_recreate.clone() {
            let name = ops::nodeeni_name(ne);
            if self.nodeenis().get_opt(&name).await?.is_some() {
                continue;
            }
            self.model.pending_recreate.remove(&ne);
            if let Some(spec) = self.model.nodeenis.get(&ne).cloned() {
                // Server-side apply, like every other write of a NodeENI: one field
                // manager owns the spec, so a later apply drops what it leaves out.
                let obj = self.nodeeni_object(ne, &spec)?;
                self.nodeenis()
                    .patch(
                        &name,
                        &PatchParams::apply("soak").force(),
                        &Patch::Apply(&obj),
                    )
                    .await?;
                debug!(nodeeni = %name, "re-created");
            }
        }
        Ok(())
    }

    // ---- faults ----

    /// Changes the fault layer for a fault window.
    pub fn faults(&self, f: impl FnOnce(&mut FaultConfig)) {
        self.faults.update_config(f);
    }

    /// Back to [`base_faults`].
    pub fn faults_off(&self) {
        self.faults.set_config(base_faults());
    }

    /// Throttling storm: buckets 20x smaller.
    pub fn throttle_storm(&self) {
        self.faults(|c| c.throttle.scale = 0.05);
    }

    /// 30% of requests fail with InternalError.
    pub fn error_burst(&self) {
        self.faults(|c| c.error_rate = 0.3);
    }

    /// 0.2-1.5 s per request.
    pub fn latency_spike(&self) {
        self.faults(|c| {
            c.latency = LatencyConfig {
                min_ms: 200,
                max_ms: 1500,
            }
        });
    }

    /// Graceful detaches hang until forced.
    pub fn hung_detaches(&self) {
        self.faults(|c| c.hang_detaches = true);
    }

    // ---- EC2, directly ----

    /// Every ENI in moto.
    pub async fn all_enis(&self) -> Result<Vec<NetworkInterface>, Error> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let resp = self
                .ec2
                .describe_network_interfaces()
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| ec2_err("describe ENIs", e))?;
            out.extend(resp.network_interfaces().iter().cloned());
            token = resp.next_token().map(String::from);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// One ENI from moto (`None` if gone).
    pub async fn describe_eni(&self, id: &str) -> Result<Option<NetworkInterface>, Error> {
        let resp = self
            .ec2
            .describe_network_interfaces()
            .filters(
                Filter::builder()
                    .name("network-interface-id")
                    .values(id)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| ec2_err("describe ENI", e))?;
        Ok(resp.network_interfaces().first().cloned())
    }

    /// The cluster's ENIs in moto (not the twin cluster's), sorted by ID.
    pub async fn cluster_enis(&self) -> Result<Vec<NetworkInterface>, Error> {
        let foreign: BTreeSet<&str> = self.model.foreign.iter().map(|f| f.id.as_str()).collect();
        let mut v: Vec<NetworkInterface> = self
            .all_enis()
            .await?
            .into_iter()
            .filter(|e| tag_value(e, eni_api::tags::CLUSTER) == Some(CLUSTER))
            .filter(|e| !foreign.contains(e.network_interface_id().unwrap_or_default()))
            .collect();
        v.sort_by(|a, b| a.network_interface_id().cmp(&b.network_interface_id()));
        Ok(v)
    }

    /// Detaches the `pick`-th attached cluster ENI behind the controller's back.
    pub async fn oob_detach(&mut self, pick: u32) -> Result<Option<String>, Error> {
        let attached: Vec<NetworkInterface> = self
            .cluster_enis()
            .await?
            .into_iter()
            .filter(|e| e.attachment().is_some())
            .collect();
        if attached.is_empty() {
            return Ok(None);
        }
        let eni = &attached[pick as usize % attached.len()];
        let id = eni.network_interface_id().unwrap_or_default().to_string();
        let att = eni
            .attachment()
            .and_then(|a| a.attachment_id())
            .unwrap_or_default();
        let res = self
            .ec2
            .detach_network_interface()
            .attachment_id(att)
            .send()
            .await;
        if !applied(res, "out-of-band detach", &id)? {
            return Ok(None);
        }
        *self.model.oob_detaches.entry(id.clone()).or_default() += 1;
        Ok(Some(id))
    }

    /// Detaches (if attached) and deletes the `pick`-th cluster ENI.
    pub async fn oob_delete(&mut self, pick: u32) -> Result<Option<String>, Error> {
        let enis = self.cluster_enis().await?;
        if enis.is_empty() {
            return Ok(None);
        }
        let eni = &enis[pick as usize % enis.len()];
        let id = eni.network_interface_id().unwrap_or_default().to_string();
        if let Some(att) = eni.attachment().and_then(|a| a.attachment_id()) {
            let res = self
                .ec2
                .detach_network_interface()
                .attachment_id(att)
                .send()
                .await;
            if !applied(res, "out-of-band detach", &id)? {
                return Ok(None);
            }
        }
        let res = self
            .ec2
            .delete_network_interface()
            .network_interface_id(&id)
            .send()
            .await;
        Ok(applied(res, "out-of-band delete", &id)?.then_some(id))
    }

    async fn create_foreign_eni(
        &self,
        subnet: &str,
        description: &str,
        extra_tags: &[(String, String)],
    ) -> Result<String, Error> {
        let mut tags = TagSpecification::builder()
            .resource_type(ResourceType::NetworkInterface)
            .tags(tag("owner", "someone-else"));
        for (k, v) in extra_tags {
            tags = tags.tags(tag(k, v));
        }
        self.ec2
            .create_network_interface()
            .subnet_id(subnet)
            .groups(&self.groups[0].1)
            .description(description)
            .tag_specifications(tags.build())
            .send()
            .await
            .map_err(|e| ec2_err("create foreign ENI", e))?
            .network_interface()
            .and_then(|n| n.network_interface_id())
            .map(String::from)
            .ok_or_else(|| Error::Ec2("no ENI id".into()))
    }

    /// Attaches a foreign ENI to `node`'s instance at `index`, through the fault layer so
    /// EC2's index check applies (an occupied index makes this a no-op). A `twin` carries
    /// this cluster's name and the tags of the slot at that index, with another cluster's
    /// identity.
    pub async fn foreign_attach(
        &mut self,
        node: u8,
        ne: u8,
        index: i32,
        twin: bool,
    ) -> Result<Option<String>, Error> {
        let Some(instance) = self.model.nodes.get(&node).map(|n| n.instance_id.clone()) else {
            return Ok(None);
        };
        let extra = if twin {
            twin_tags(ne, &ops::node_name(node), &instance, index)
        } else {
            Vec::new()
        };
        let id = self
            .create_foreign_eni(&self.subnets[0].1.clone(), "foreign: not ours", &extra)
            .await?;
        let attached = self
            .ec2_faulty
            .attach_network_interface()
            .network_interface_id(&id)
            .instance_id(&instance)
            .device_index(index)
            .send()
            .await;
        if let Err(e) = attached {
            debug!(error = %aws_sdk_ec2::error::DisplayErrorContext(&e), "foreign attach refused");
            self.ec2
                .delete_network_interface()
                .network_interface_id(&id)
                .send()
                .await
                .map_err(|e| ec2_err("delete refused foreign ENI", e))?;
            return Ok(None);
        }
        if let Some(eni) = self.describe_eni(&id).await? {
            self.model.foreign.push(foreign_of(&eni));
        }
        Ok(Some(id))
    }

    /// Detaches and deletes the `pick`-th attached foreign ENI.
    pub async fn foreign_remove(&mut self, pick: u32) -> Result<Option<String>, Error> {
        let attached: Vec<usize> = (0..self.model.foreign.len())
            .filter(|i| self.model.foreign[*i].attachment_id.is_some())
            .collect();
        if attached.is_empty() {
            return Ok(None);
        }
        let f = self
            .model
            .foreign
            .remove(attached[pick as usize % attached.len()]);
        if let Some(att) = &f.attachment_id {
            self.ec2
                .detach_network_interface()
                .attachment_id(att)
                .send()
                .await
                .map_err(|e| ec2_err("detach foreign ENI", e))?;
        }
        self.ec2
            .delete_network_interface()
            .network_interface_id(&f.id)
            .send()
            .await
            .map_err(|e| ec2_err("delete foreign ENI", e))?;
        Ok(Some(f.id))
    }
}

/// Identity of the twin cluster (same `--cluster-name`, another cluster).
pub const TWIN_CLUSTER_ID: &str = "00000000-0000-4000-8000-7717c1a57e25";

/// Tags a twin cluster's controller puts on its ENI for the slot (ne, node, index).
pub fn twin_tags(ne: u8, node: &str, instance: &str, index: i32) -> Vec<(String, String)> {
    use eni_api::tags;
    [
        (tags::CLUSTER, CLUSTER.to_string()),
        (tags::CLUSTER_ID, TWIN_CLUSTER_ID.to_string()),
        (tags::NODE_ENI, ops::nodeeni_name(ne)),
        (tags::NODE, node.to_string()),
        (tags::INSTANCE, instance.to_string()),
        (tags::DEVICE_INDEX, index.to_string()),
        (tags::NO_MANAGE, "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Description variant `d` of a spec.
pub fn description(d: u8) -> String {
    format!("soak description {d}")
}

/// A tag's value.
pub fn tag_value<'a>(eni: &'a NetworkInterface, key: &str) -> Option<&'a str> {
    eni.tag_set()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// Sorted security-group IDs of an ENI.
pub fn groups_of(eni: &NetworkInterface) -> Vec<String> {
    let mut g: Vec<String> = eni
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(String::from))
        .collect();
    g.sort();
    g
}

/// The model record of a foreign ENI as it is now.
pub fn foreign_of(eni: &NetworkInterface) -> Foreign {
    Foreign {
        id: eni.network_interface_id().unwrap_or_default().to_string(),
        attachment_id: eni
            .attachment()
            .and_then(|a| a.attachment_id())
            .map(String::from),
        instance_id: eni
            .attachment()
            .and_then(|a| a.instance_id())
            .map(String::from),
        device_index: eni.attachment().and_then(|a| a.device_index()),
        groups: groups_of(eni),
        description: eni.description().unwrap_or_default().to_string(),
        tags: eni
            .tag_set()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_string(),
                    t.value().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    }
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<(), Error> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => Ok(other?),
    }
}

/// Unused pools are kept in range by construction; this documents the assumption.
const _: () = assert!(NODES > 0 && NODEENIS > 0 && REPLICAS == 2);
