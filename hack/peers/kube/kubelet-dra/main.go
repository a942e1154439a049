// Command kubelet-dra is a kubelet stand-in built from the kubelet's own DRA code: the
// DRA manager of k8s.io/kubernetes/pkg/kubelet/cm/dra (claim info cache and checkpoint,
// its DRA plugin manager and gRPC client) registered as the "DRAPlugin" handler of the
// kubelet plugin manager (pkg/kubelet/pluginmanager) watching a plugins_registry
// directory, as in the kubelet's container manager.
//
// It is driven over stdio, one line per message:
//
//	stdout: JSON events, one object per line, always with an "event" field:
//	  {"event":"ready","registry":DIR,"generation":N}
//	  {"event":"registered","driver":D,"endpoint":P,"versions":[..]}
//	  {"event":"deregistered","driver":D,"endpoint":P}
//	  {"event":"result","cmd":C,"ok":true|false,"error":"...","response":{...}}
//	stdin: commands
//	  prepare <ns>/<pod>        PrepareResources(pod), then the CDI devices per container
//	  unprepare <ns>/<pod>      UnprepareResources(pod)
//	  bench <ns>/<pod> <n>      n x (prepare, unprepare); prepare latency p50/p99 (ms)
//	  wait <driver> [<seconds>]  until the driver is registered (default 30 s)
//	  restart                   stop the plugin manager and the DRA manager, start both
//	                            again from the same state directory (a kubelet restart)
//	  quit
//
// The pod and its claims must exist in the API server, allocated and reserved for the
// pod (the scheduler's work), as the kubelet requires. Pods prepared and not unprepared
// are the "active pods" the manager's reconcile loop sees.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
)

type allSourcesReady struct{}

func (allSourcesReady) AddSource(string) {}
func (allSourcesReady) AllReady() bool   { return true }

type harness struct {
	client   kubernetes.Interface
	nodeName string
	registry string
	stateDir string

	outMu sync.Mutex
	out   *json.Encoder

	mu     sync.Mutex
	mgr    *dra.Manager
	cancel context.CancelFunc
	stop   chan struct{}
	gen    int
	active map[string]*v1.Pod
	// registered drivers (endpoint by name)
	drivers map[string]string
}

func (h *harness) emit(v map[string]any) {
	h.outMu.Lock()
	defer h.outMu.Unlock()
	v["ts"] = time.Now().UnixNano()
	_ = h.out.Encode(v)
}

// handler forwards plugin-manager callbacks to the current DRA manager's handler and
// reports them.
type handler struct{ h *harness }

func (r handler) current() (*dra.Manager, error) {
	r.h.mu.Lock()
	defer r.h.mu.Unlock()
	if r.h.mgr == nil {
		return nil, fmt.Errorf("kubelet restarting")
	}
	return r.h.mgr, nil
}

func (r handler) ValidatePlugin(ctx context.Context, name, endpoint string, versions []string) error {
	m, err := r.current()
	if err != nil {
		return err
	}
	return m.GetWatcherHandler().ValidatePlugin(ctx, name, endpoint, versions)
}

func (r handler) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	m, err := r.current()
	if err != nil {
		return err
	}
	if err := m.GetWatcherHandler().RegisterPlugin(ctx, name, endpoint, versions, timeout); err != nil {
		return err
	}
	r.h.mu.Lock()
	r.h.drivers[name] = endpoint
	r.h.mu.Unlock()
	r.h.emit(map[string]any{"event": "registered", "driver": name, "endpoint": endpoint, "versions": versions})
	return nil
}

func (r handler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	if m, err := r.current(); err == nil {
		m.GetWatcherHandler().DeRegisterPlugin(ctx, name, endpoint)
	}
	r.h.mu.Lock()
	if r.h.drivers[name] == endpoint {
		delete(r.h.drivers, name)
	}
	r.h.mu.Unlock()
	r.h.emit(map[string]any{"event": "deregistered", "driver": name, "endpoint": endpoint})
}

func (h *harness) activePods() []*v1.Pod {
	h.mu.Lock()
	defer h.mu.Unlock()
	pods := make([]*v1.Pod, 0, len(h.active))
	for _, p := range h.active {
		pods = append(pods, p)
	}
	return pods
}

func (h *harness) getNode(ctx context.Context) (*v1.Node, error) {
	return h.client.CoreV1().Nodes().Get(ctx, h.nodeName, metav1.GetOptions{})
}

// start creates the DRA manager from the state directory and the plugin manager on the
// registry directory, as the kubelet does at start-up.
func (h *harness) start() error {
	mgr, err := dra.NewManager(klog.Background(), h.client, h.stateDir)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := mgr.Start(ctx, h.activePods, h.getNode, allSourcesReady{}); err != nil {
		cancel()
		return err
	}
	stop := make(chan struct{})
	h.mu.Lock()
	h.mgr, h.cancel, h.stop = mgr, cancel, stop
	h.drivers = map[string]string{}
	h.gen++
	gen := h.gen
	h.mu.Unlock()
	pm := pluginmanager.NewPluginManager(h.registry, &record.FakeRecorder{})
	pm.AddHandler("DRAPlugin", handler{h})
	go pm.Run(ctx, allSourcesReady{}, stop)
	h.emit(map[string]any{"event": "ready", "registry": h.registry, "generation": gen})
	return nil
}

func (h *harness) shutdown() {
	h.mu.Lock()
	mgr, cancel, stop := h.mgr, h.cancel, h.stop
	h.mgr = nil
	h.mu.Unlock()
	if stop != nil {
		close(stop)
	}
	if cancel != nil {
		cancel()
	}
	if mgr != nil {
		mgr.Stop()
	}
}

func (h *harness) pod(ctx context.Context, ref string) (*v1.Pod, error) {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok {
		return nil, fmt.Errorf("want <namespace>/<pod>, got %q", ref)
	}
	return h.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
}

func (h *harness) manager() (*dra.Manager, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.mgr == nil {
		return nil, fmt.Errorf("not started")
	}
	return h.mgr, nil
}

func (h *harness) prepare(ctx context.Context, pod *v1.Pod) (map[string]any, error) {
	m, err := h.manager()
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.active[string(pod.UID)] = pod
	h.mu.Unlock()
	if err := m.PrepareResources(ctx, pod); err != nil {
		return nil, err
	}
	containers := map[string]any{}
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		info, err := m.GetResources(pod, c)
		if err != nil {
			return nil, err
		}
		ids := []string{}
		for _, d := range info.CDIDevices {
			ids = append(ids, d.Name)
		}
		containers[c.Name] = map[string]any{"cdiDevices": ids}
	}
	return map[string]any{"containers": containers}, nil
}

func (h *harness) unprepare(ctx context.Context, pod *v1.Pod) error {
	m, err := h.manager()
	if err != nil {
		return err
	}
	h.mu.Lock()
	delete(h.active, string(pod.UID))
	h.mu.Unlock()
	return m.UnprepareResources(ctx, pod)
}

func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p)
	return float64(sorted[i].Microseconds()) / 1000
}

func (h *harness) command(line string) (bool, error) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	result := func(resp any, err error) {
		ev := map[string]any{"event": "result", "cmd": f[0], "ok": err == nil}
		if err != nil {
			ev["error"] = err.Error()
		}
		if resp != nil {
			ev["response"] = resp
		}
		h.emit(ev)
	}
	switch f[0] {
	case "quit":
		return true, nil
	case "wait":
		if len(f) < 2 {
			result(nil, fmt.Errorf("usage: wait <driver> [<seconds>]"))
			break
		}
		secs := 30
		if len(f) > 2 {
			if n, err := strconv.Atoi(f[2]); err == nil {
				secs = n
			}
		}
		deadline := time.Now().Add(time.Duration(secs) * time.Second)
		for {
			h.mu.Lock()
			endpoint, ok := h.drivers[f[1]]
			h.mu.Unlock()
			if ok {
				result(map[string]any{"endpoint": endpoint}, nil)
				break
			}
			if time.Now().After(deadline) {
				result(nil, fmt.Errorf("driver %s not registered after %ds", f[1], secs))
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	case "restart":
		h.shutdown()
		result(nil, h.start())
	case "prepare", "unprepare":
		if len(f) != 2 {
			result(nil, fmt.Errorf("usage: %s <ns>/<pod>", f[0]))
			break
		}
		pod, err := h.pod(ctx, f[1])
		if err != nil {
			result(nil, err)
			break
		}
		if f[0] == "prepare" {
			result(h.prepare(ctx, pod))
		} else {
			result(nil, h.unprepare(ctx, pod))
		}
	case "bench":
		n, err := strconv.Atoi(f[len(f)-1])
		if len(f) != 3 || err != nil || n < 1 {
			result(nil, fmt.Errorf("usage: bench <ns>/<pod> <n>"))
			break
		}
		pod, err := h.pod(ctx, f[1])
		if err != nil {
			result(nil, err)
			break
		}
		lat := make([]time.Duration, 0, n)
		var failed error
		for i := 0; i < n && failed == nil; i++ {
			t := time.Now()
			if _, err := h.prepare(ctx, pod); err != nil {
				failed = fmt.Errorf("prepare %d: %w", i, err)
				break
			}
			lat = append(lat, time.Since(t))
			if err := h.unprepare(ctx, pod); err != nil {
				failed = fmt.Errorf("unprepare %d: %w", i, err)
			}
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		result(map[string]any{"n": len(lat), "p50_ms": percentile(lat, 0.50), "p99_ms": percentile(lat, 0.99),
			"max_ms": percentile(lat, 1)}, failed)
	default:
		result(nil, fmt.Errorf("unknown command %q", f[0]))
	}
	return false, nil
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the API server")
	nodeName := flag.String("node-name", "", "this node")
	registry := flag.String("plugins-registry", "", "plugins_registry directory watched by the plugin manager")
	stateDir := flag.String("state-dir", "", "directory of the DRA manager's checkpoint")
	klogFlags := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(klogFlags)
	verbosity := flag.String("v", "0", "klog verbosity (logs go to stderr)")
	flag.Parse()
	_ = klogFlags.Set("v", *verbosity)
	_ = klogFlags.Set("logtostderr", "true")
	if *kubeconfig == "" || *nodeName == "" || *registry == "" || *stateDir == "" {
		fmt.Fprintln(os.Stderr, "--kubeconfig, --node-name, --plugins-registry and --state-dir are required")
		os.Exit(2)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	// The kubelet's defaults (kubeAPIQPS 50, kubeAPIBurst 100), not client-go's 5/10.
	cfg.QPS, cfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for _, d := range []string{*registry, *stateDir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	h := &harness{
		client:   client,
		nodeName: *nodeName,
		registry: *registry,
		stateDir: *stateDir,
		out:      json.NewEncoder(os.Stdout),
		active:   map[string]*v1.Pod{},
		drivers:  map[string]string{},
	}
	if err := h.start(); err != nil {
		fmt.Fprintln(os.Stderr, "start:", err)
		os.Exit(1)
	}
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if done, _ := h.command(sc.Text()); done {
			break
		}
	}
	h.shutdown()
}
