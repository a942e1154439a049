package main

// The kubelet's own PodResources v1 server (k8s.io/kubernetes/pkg/kubelet/apis/podresources,
// NewV1PodResourcesServer) on the socket given with --pod-resources, answering from pods
// and device allocations the harness is told about over stdin:
//
//	hold <namespace>/<pod> <container> <resource> <id>[,<id>...]   a running pod holds devices
//	unhold <namespace>/<pod>                                       the pod is gone
//
// Only the providers are the harness's (which pods run, which devices their containers
// hold); List, Get and the response assembly are the kubelet's code.

import (
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"sync"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
)

// podStore is the PodsProvider and DevicesProvider of the PodResources server.
type podStore struct {
	mu   sync.Mutex
	pods map[string]*v1.Pod                                           // "<ns>/<name>"
	devs map[types.UID]map[string][]*podresourcesapi.ContainerDevices // pod UID -> container
	n    int
}

func newPodStore() *podStore {
	return &podStore{pods: map[string]*v1.Pod{}, devs: map[types.UID]map[string][]*podresourcesapi.ContainerDevices{}}
}

func (s *podStore) hold(key, container, resource string, ids []string) error {
	ns, name, ok := strings.Cut(key, "/")
	if !ok || ns == "" || name == "" {
		return fmt.Errorf("pod %q: want <namespace>/<name>", key)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	pod, ok := s.pods[key]
	if !ok {
		s.n++
		pod = &v1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(fmt.Sprintf("uid-%d", s.n))}}
		pod.Status.Phase = v1.PodRunning
		s.pods[key] = pod
		s.devs[pod.UID] = map[string][]*podresourcesapi.ContainerDevices{}
	}
	known := false
	for _, c := range pod.Spec.Containers {
		known = known || c.Name == container
	}
	if !known {
		pod.Spec.Containers = append(pod.Spec.Containers, v1.Container{Name: container})
	}
	s.devs[pod.UID][container] = append(s.devs[pod.UID][container], &podresourcesapi.ContainerDevices{ResourceName: resource, DeviceIds: ids})
	return nil
}

func (s *podStore) unhold(key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	pod, ok := s.pods[key]
	if !ok {
		return fmt.Errorf("no pod %q", key)
	}
	delete(s.devs, pod.UID)
	delete(s.pods, key)
	return nil
}

func (s *podStore) GetActivePods() []*v1.Pod { return s.GetPods() }

func (s *podStore) GetPods() []*v1.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*v1.Pod, 0, len(s.pods))
	for _, p := range s.pods {
		out = append(out, p.DeepCopy())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name })
	return out
}

func (s *podStore) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.pods[namespace+"/"+name]
	if !ok {
		return nil, false
	}
	return p.DeepCopy(), true
}

func (s *podStore) UpdateAllocatedDevices(klog.Logger) {}

func (s *podStore) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devs[types.UID(podUID)][containerName]
}

func (s *podStore) GetAllocatableDevices(klog.Logger) []*podresourcesapi.ContainerDevices {
	return nil
}

// noResources: no CPU, memory or DRA managers in this harness.
type noResources struct{}

func (noResources) GetCPUs(*v1.Pod, *v1.Container) []int64 { return nil }
func (noResources) GetPodCPUs(string) []int64              { return nil }
func (noResources) GetAllocatableCPUs() []int64            { return nil }
func (noResources) GetMemory(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.ContainerMemory {
	return nil
}
func (noResources) GetPodMemory(klog.Logger, string) []*podresourcesapi.ContainerMemory { return nil }
func (noResources) GetAllocatableMemory(klog.Logger) []*podresourcesapi.ContainerMemory { return nil }
func (noResources) GetDynamicResources(klog.Logger, *v1.Pod, *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}

// servePodResources serves the kubelet's PodResources v1 API on a Unix socket.
func servePodResources(socket string, store *podStore) (*grpc.Server, error) {
	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	lis, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	srv := grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(srv, podresources.NewV1PodResourcesServer(context.Background(), podresources.PodResourcesProviders{
		Pods:             store,
		Devices:          store,
		Cpus:             noResources{},
		Memory:           noResources{},
		DynamicResources: noResources{},
	}))
	go func() { _ = srv.Serve(lis) }()
	return srv, nil
}
