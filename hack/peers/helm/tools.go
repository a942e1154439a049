//go:build tools

// Package tools pins the peer binary built from this module.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
