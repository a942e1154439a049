//go:build tools

// Package tools pins the peer binary built from this module.
package tools

import _ "github.com/containernetworking/cni/cnitool"
