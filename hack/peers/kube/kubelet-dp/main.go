// Command kubelet-dp is a minimal kubelet stand-in built from the kubelet's own device
// manager code: the registration server and plugin client of
// k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1, and optionally the
// kubelet plugin manager watching a plugins_registry directory.
//
// It is driven over stdio, one line per message:
//
//	stdout: JSON events, one object per line, always with an "event" field:
//	  {"event":"ready","socket":"<dir>/kubelet.sock","generation":N}
//	  {"event":"registered","resource":R,"endpoint":P,"options":{...}}
//	  {"event":"devices","resource":R,"devices":[{"id":..,"health":..,"numa":[..]}],"healthy":H,"total":T}
//	  {"event":"disconnected","resource":R,"endpoint":P}
//	  {"event":"result","cmd":C,"ok":true|false,"error":"...","response":{...}}
//	stdin: commands
//	  allocate <resource> <id> [<id>...]        Allocate for one container
//	  preferred <resource> <size> <avail,ids> [<must,ids>]
//	  options <resource>                        GetDevicePluginOptions
//	  prestart <resource> <id> [<id>...]        PreStartContainer
//	  bench <resource> <n> <id> [<id>...]       n Allocate calls; p50/p99 in the result
//	  restart                                   stop, wipe sockets, serve kubelet.sock again
//	  hold <ns>/<pod> <container> <resource> <id,id...>   a running pod holds devices (PodResources)
//	  unhold <ns>/<pod>                         the pod is gone (PodResources)
//	  quit
//
// By default it exits when stdin closes; --exit-on-stdin-eof=false keeps it running until
// SIGINT/SIGTERM, for use as a long-running kubelet stand-in (e.g. the demo).
//
// With --pod-resources it serves the kubelet's PodResources v1 API (the kubelet's own
// server code, see podresources.go) on that socket.
//
// With --kubeconfig and --node-name it also writes status.capacity (all devices) and
// status.allocatable (healthy devices) of the registered resources onto the Node object,
// as the kubelet does.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
	kconfig "k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
)

type harness struct {
	dir    string
	logger klog.Logger

	outMu sync.Mutex
	out   *json.Encoder

	mu      sync.Mutex
	plugins map[string]plugin.DevicePlugin
	devices map[string][]*api.Device
	server  plugin.Server
	gen     int

	nodes    kubernetes.Interface
	nodeName string

	pods *podStore
}

func (h *harness) emit(v map[string]any) {
	h.outMu.Lock()
	defer h.outMu.Unlock()
	v["ts"] = time.Now().UnixNano()
	_ = h.out.Encode(v)
}

// CleanupPluginDirectory removes every socket in the directory, as the kubelet's device
// manager does when it starts.
func (h *harness) CleanupPluginDirectory(_ klog.Logger, dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type()&os.ModeSocket == 0 {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

// PluginConnected mirrors the device manager: fetch the options, remember the endpoint.
func (h *harness) PluginConnected(ctx context.Context, resource string, p plugin.DevicePlugin) error {
	opts, err := p.API().GetDevicePluginOptions(ctx, &api.Empty{})
	if err != nil {
		return fmt.Errorf("failed to get device plugin options: %v", err)
	}
	h.mu.Lock()
	h.plugins[resource] = p
	h.mu.Unlock()
	h.emit(map[string]any{"event": "registered", "resource": resource, "endpoint": p.SocketPath(), "options": opts})
	return nil
}

func (h *harness) PluginDisconnected(_ klog.Logger, resource string, socket string) {
	h.mu.Lock()
	if p, ok := h.plugins[resource]; ok && p.SocketPath() == socket {
		delete(h.plugins, resource)
		// The kubelet marks every device of a disconnected plugin unhealthy.
		for _, d := range h.devices[resource] {
			d.Health = api.Unhealthy
		}
	}
	h.mu.Unlock()
	h.emit(map[string]any{"event": "disconnected", "resource": resource, "endpoint": socket})
	h.patchNode()
}

func (h *harness) PluginListAndWatchReceiver(_ klog.Logger, resource string, resp *api.ListAndWatchResponse) {
	type dev struct {
		ID     string  `json:"id"`
		Health string  `json:"health"`
		NUMA   []int64 `json:"numa"`
	}
	devs := make([]dev, 0, len(resp.Devices))
	healthy := 0
	for _, d := range resp.Devices {
		numa := []int64{}
		if d.Topology != nil {
			for _, n := range d.Topology.Nodes {
				numa = append(numa, n.ID)
			}
		}
		if d.Health == api.Healthy {
			healthy++
		}
		devs = append(devs, dev{d.ID, d.Health, numa})
	}
	h.mu.Lock()
	h.devices[resource] = resp.Devices
	h.mu.Unlock()
	h.emit(map[string]any{"event": "devices", "resource": resource, "devices": devs, "healthy": healthy, "total": len(devs)})
	h.patchNode()
}

// patchNode writes capacity / allocatable of every known resource onto the Node.
func (h *harness) patchNode() {
	if h.nodes == nil {
		return
	}
	h.mu.Lock()
	capacity := map[string]string{}
	allocatable := map[string]string{}
	for r, devs := range h.devices {
		healthy := 0
		for _, d := range devs {
			if d.Health == api.Healthy {
				healthy++
			}
		}
		capacity[r] = strconv.Itoa(len(devs))
		allocatable[r] = strconv.Itoa(healthy)
	}
	h.mu.Unlock()
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"capacity": capacity, "allocatable": allocatable}})
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = h.nodes.CoreV1().Nodes().Patch(ctx, h.nodeName, types.MergePatchType, patch, metav1PatchOptions(), "status")
	if err != nil {
		h.emit(map[string]any{"event": "node-patch-error", "error": err.Error()})
		return
	}
	h.emit(map[string]any{"event": "node-patched", "node": h.nodeName, "capacity": capacity, "allocatable": allocatable})
}

func (h *harness) start() error {
	srv, err := plugin.NewServer(h.logger, filepath.Join(h.dir, api.KubeletSocket[len(api.DevicePluginPath):]), h, h)
	if err != nil {
		return err
	}
	if err := srv.Start(h.logger); err != nil {
		return err
	}
	h.mu.Lock()
	h.server = srv
	h.gen++
	gen := h.gen
	h.mu.Unlock()
	h.emit(map[string]any{"event": "ready", "socket": srv.SocketPath(), "generation": gen})
	return nil
}

// restart behaves like a kubelet restart: the old server goes away (connections drop,
// kubelet.sock disappears), then the new one wipes every socket in the directory and
// serves a fresh kubelet.sock.
func (h *harness) restart() error {
	h.mu.Lock()
	srv := h.server
	h.server = nil
	h.mu.Unlock()
	if srv != nil {
		if err := srv.Stop(h.logger); err != nil {
			return err
		}
	}
	h.mu.Lock()
	h.plugins = map[string]plugin.DevicePlugin{}
	h.mu.Unlock()
	return h.start()
}

func (h *harness) client(resource string) (api.DevicePluginClient, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p, ok := h.plugins[resource]
	if !ok {
		return nil, fmt.Errorf("no plugin registered for %q", resource)
	}
	return p.API(), nil
}

func splitIDs(s string) []string {
	if s == "" || s == "-" {
		return []string{}
	}
	return strings.Split(s, ",")
}

func (h *harness) command(line string) (bool, error) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return false, nil
	}
	cmd := f[0]
	result := func(resp any, err error) {
		ev := map[string]any{"event": "result", "cmd": cmd, "ok": err == nil}
		if err != nil {
			ev["error"] = err.Error()
		}
		if resp != nil && err == nil {
			ev["response"] = resp
		}
		h.emit(ev)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	need := func(n int) bool {
		if len(f) < n {
			result(nil, fmt.Errorf("usage error: %q needs at least %d arguments", cmd, n-1))
			return false
		}
		return true
	}
	switch cmd {
	case "quit":
		return true, nil
	case "restart":
		result(nil, h.restart())
	case "options":
		if !need(2) {
			return false, nil
		}
		c, err := h.client(f[1])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		result(c.GetDevicePluginOptions(ctx, &api.Empty{}))
	case "allocate":
		if !need(3) {
			return false, nil
		}
		c, err := h.client(f[1])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		req := &api.AllocateRequest{ContainerRequests: []*api.ContainerAllocateRequest{{DevicesIds: f[2:]}}}
		result(c.Allocate(ctx, req))
	case "prestart":
		if !need(3) {
			return false, nil
		}
		c, err := h.client(f[1])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		result(c.PreStartContainer(ctx, &api.PreStartContainerRequest{DevicesIds: f[2:]}))
	case "preferred":
		if !need(4) {
			return false, nil
		}
		c, err := h.client(f[1])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		size, err := strconv.Atoi(f[2])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		must := []string{}
		if len(f) > 4 {
			must = splitIDs(f[4])
		}
		req := &api.PreferredAllocationRequest{ContainerRequests: []*api.ContainerPreferredAllocationRequest{{
			AvailableDeviceIDs:   splitIDs(f[3]),
			MustIncludeDeviceIDs: must,
			AllocationSize:       int32(size),
		}}}
		result(c.GetPreferredAllocation(ctx, req))
	case "bench":
		if !need(4) {
			return false, nil
		}
		c, err := h.client(f[1])
		if err != nil {
			result(nil, err)
			return false, nil
		}
		n, err := strconv.Atoi(f[2])
		if err != nil || n <= 0 {
			result(nil, fmt.Errorf("bad count %q", f[2]))
			return false, nil
		}
		req := &api.AllocateRequest{ContainerRequests: []*api.ContainerAllocateRequest{{DevicesIds: f[3:]}}}
		lat := make([]time.Duration, 0, n)
		start := time.Now()
		for i := 0; i < n; i++ {
			t := time.Now()
			if _, err := c.Allocate(context.Background(), req); err != nil {
				result(nil, fmt.Errorf("call %d: %v", i, err))
				return false, nil
			}
			lat = append(lat, time.Since(t))
		}
		total := time.Since(start)
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		pct := func(p float64) float64 {
			i := int(p*float64(n)+0.5) - 1
			if i < 0 {
				i = 0
			}
			if i >= n {
				i = n - 1
			}
			return float64(lat[i].Microseconds())
		}
		result(map[string]any{"calls": n, "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": float64(lat[n-1].Microseconds()), "total_ms": total.Milliseconds()}, nil)
	case "hold":
		if !need(5) {
			return false, nil
		}
		result(nil, h.pods.hold(f[1], f[2], f[3], splitIDs(f[4])))
	case "unhold":
		if !need(2) {
			return false, nil
		}
		result(nil, h.pods.unhold(f[1]))
	default:
		result(nil, fmt.Errorf("unknown command %q", cmd))
	}
	return false, nil
}

type allSourcesReady struct{}

func (allSourcesReady) AddSource(string) {}
func (allSourcesReady) AllReady() bool   { return true }

var _ kconfig.SourcesReady = allSourcesReady{}

func main() {
	dir := flag.String("dir", "", "device-plugin directory (kubelet.sock is served here)")
	registry := flag.String("plugins-registry", "", "optional plugins_registry directory watched by the kubelet plugin manager")
	kubeconfig := flag.String("kubeconfig", "", "optional kubeconfig: write capacity/allocatable onto the Node")
	nodeName := flag.String("node-name", "", "Node whose status is written (with --kubeconfig)")
	podResources := flag.String("pod-resources", "", "optional socket to serve the kubelet's PodResources v1 API on (pods and devices from hold/unhold)")
	exitOnEOF := flag.Bool("exit-on-stdin-eof", true, "exit when stdin closes; with false, run until SIGINT/SIGTERM (long-running kubelet stand-in)")
	klogFlags := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(klogFlags)
	verbosity := flag.String("v", "0", "klog verbosity (logs go to stderr)")
	flag.Parse()
	_ = klogFlags.Set("v", *verbosity)
	_ = klogFlags.Set("logtostderr", "true")

	if *dir == "" {
		fmt.Fprintln(os.Stderr, "--dir is required")
		os.Exit(2)
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	h := &harness{
		dir:     abs,
		logger:  klog.Background(),
		out:     json.NewEncoder(os.Stdout),
		plugins: map[string]plugin.DevicePlugin{},
		devices: map[string][]*api.Device{},
		pods:    newPodStore(),
	}
	if *podResources != "" {
		srv, err := servePodResources(*podResources, h.pods)
		if err != nil {
			fmt.Fprintln(os.Stderr, "pod-resources:", err)
			os.Exit(1)
		}
		defer srv.Stop()
		h.emit(map[string]any{"event": "pod-resources", "socket": *podResources})
	}
	if *kubeconfig != "" {
		if *nodeName == "" {
			fmt.Fprintln(os.Stderr, "--node-name is required with --kubeconfig")
			os.Exit(2)
		}
		cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		h.nodes, err = kubernetes.NewForConfig(cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		h.nodeName = *nodeName
	}
	if err := os.MkdirAll(abs, 0o750); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := h.start(); err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		os.Exit(1)
	}
	stop := make(chan struct{})
	if *registry != "" {
		if err := os.MkdirAll(*registry, 0o750); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pm := pluginmanager.NewPluginManager(*registry, &record.FakeRecorder{})
		// The registration server is the device-plugin handler of the plugin manager,
		// exactly as in the kubelet (ManagerImpl.GetWatcherHandler).
		pm.AddHandler("DevicePlugin", registryHandler{h})
		go pm.Run(context.Background(), allSourcesReady{}, stop)
		h.emit(map[string]any{"event": "plugin-manager", "dir": *registry})
	}

	quit := false
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		done, err := h.command(sc.Text())
		if err != nil || done {
			quit = true
			break
		}
	}
	if !quit && !*exitOnEOF {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
		<-sigs
	}
	close(stop)
	h.mu.Lock()
	srv := h.server
	h.mu.Unlock()
	if srv != nil {
		_ = srv.Stop(h.logger)
	}
}

func metav1PatchOptions() metav1.PatchOptions { return metav1.PatchOptions{} }

// registryHandler hands plugin-manager callbacks to whichever registration server is
// current, so plugins_registry registration keeps working across "restart".
type registryHandler struct{ h *harness }

func (r registryHandler) current() plugin.Server {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	return r.h.server
}

func (r registryHandler) ValidatePlugin(ctx context.Context, name, endpoint string, versions []string) error {
	s := r.current()
	if s == nil {
		return fmt.Errorf("kubelet restarting")
	}
	return s.ValidatePlugin(ctx, name, endpoint, versions)
}

func (r registryHandler) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	s := r.current()
	if s == nil {
		return fmt.Errorf("kubelet restarting")
	}
	return s.RegisterPlugin(ctx, name, endpoint, versions, timeout)
}

func (r registryHandler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	if s := r.current(); s != nil {
		s.DeRegisterPlugin(ctx, name, endpoint)
	}
}
