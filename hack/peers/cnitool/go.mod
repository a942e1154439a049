// Builds cnitool, the reference CNI runtime, to drive cni-helper in tests.
module github.com/aws-multi-eni/hack/peers/cnitool

go 1.26

require github.com/containernetworking/cni v1.3.0
