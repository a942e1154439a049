//! The `CustomResourceDefinition` generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{Error, NodeENI};

/// Header of the committed CRD file.
const HEADER: &str = "\
# Generated from the Rust types in controller/api by `eni-controller crd`.
# Do not edit: change the types and run `make crd`.
";

/// Labels on the CRD, so `kubectl get crd -l app.kubernetes.io/part-of=aws-multi-eni` finds it.
pub const CRD_LABELS: [(&str, &str); 3] = [
    ("app.kubernetes.io/component", "crd"),
    ("app.kubernetes.io/name", "aws-multi-eni"),
    ("app.kubernetes.io/part-of", "aws-multi-eni"),
];

/// The `nodeenis.networking.k8s.aws` CRD.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = NodeENI::crd();
    crd.metadata.labels = Some(
        CRD_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    crd
}

/// The CRD as the YAML committed under `charts/aws-multi-eni-controller/crds/`.
pub fn crd_yaml() -> Result<String, Error> {
    Ok(format!("{HEADER}{}", serde_yaml_ng::to_string(&crd())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_the_older_controllers_names() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("nodeenis.networking.k8s.aws")
        );
        assert_eq!(crd.spec.scope, "Cluster");
        let labels = crd.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/part-of"], "aws-multi-eni");
        assert_eq!(crd.spec.names.short_names, Some(vec!["neni".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!(
            "../../../charts/aws-multi-eni-controller/crds/nodeenis.networking.k8s.aws.yaml"
        );
        let generated = crd_yaml().expect("renders");
        assert!(
            committed == generated,
            "charts/aws-multi-eni-controller/crds/nodeenis.networking.k8s.aws.yaml is out of date: run `make crd`"
        );
    }
}
