//go:build tools

// Package tools pins the peer binary built from this module.
package tools

import _ "gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus"
