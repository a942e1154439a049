//go:build tools

// Package tools pins helm-docs for hack/peers.sh.
package tools

import _ "github.com/norwoodj/helm-docs/cmd/helm-docs"
