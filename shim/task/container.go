package task

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/runtime/v2/runc"
	"github.com/containerd/containerd/runtime/v2/runc/options"
	taskAPI "github.com/containerd/containerd/runtime/v2/task"
	runcC "github.com/containerd/go-runc"
)

// State is one container's lifecycle as zeroproxy sees it. The strings are the Python side's
// scaletozero.runtime.State values, which mirror this list.
type State string

const (
	StateCreated      State = "created"
	StateRunning      State = "running"
	StateCheckpointed State = "checkpointed" // process gone, images on disk; Running to containerd
	StateRestoring    State = "restoring"
	StateFailed       State = "failed" // the last restore failed; images kept, still Running to containerd
	StateStopped      State = "stopped"
)

// scaledDown says the process is gone while containerd must still see it Running.
func (s State) scaledDown() bool {
	return s == StateCheckpointed || s == StateRestoring || s == StateFailed
}

// container is one containerd container in this shim: runc's Container while a process exists,
// plus what survives a checkpoint, which runc's Container cannot (runc forgets a dumped container).
type container struct {
	id        string
	namespace string
	// req is containerd's create request with the options resolved to runc's: a restore builds a
	// new runc Container from it, pointed at the images.
	req  taskAPI.CreateTaskRequest
	opts *options.Options
	dir  string // checkpoint images and CRIU's logs
	spec bundleSpec

	// op serialises the operations that change which process exists (create/start aside):
	// checkpoint, restore, kill, exec and delete. It is held across runc and CRIU, so nothing
	// that only reads state takes it.
	op sync.Mutex

	mu    sync.Mutex // guards the fields below; never held across runc
	state State
	// dumping is set while CRIU dumps: the state stays running (the process exists until the
	// end of the dump), but its exit is the checkpoint's, not a real one.
	dumping  bool
	rc       *runc.Container // nil while scaled down and after a kill while scaled down
	pid      int             // host pid of the current init, or of the last one while scaled down
	initGone chan struct{}   // closed when the dumped init's exit has been reaped and dropped
	pending  *runcC.Exit     // the init's exit during a dump that then failed: a real exit after all
	early    []runcC.Exit    // exits of unknown pids during a restore (the restored init may exit at once)
	hidden   map[int]bool    // pids whose exit is still to come and must be dropped
	killing  bool            // a stop signal arrived while scaled down; the exit is on its way
	exited   chan struct{}   // closed on the init's real exit
	status   int
	exitedAt time.Time

	checkpoints int
	restores    int
	last        *OpResult
	server      *http.Server
	// held are write ends of the container's stdio FIFOs, open while it is scaled down: the CRI
	// plugin copies them into the pod's log and stops at EOF, which the dumped process's exit
	// would otherwise be, so `kubectl logs` would end at the first checkpoint.
	heldMu sync.Mutex
	held   []*os.File
}

// holdStdio opens a writer on each stdio FIFO of the container (not on files or loggers: those
// have no reader to lose), before the dumped process's own writers are closed. Idempotent.
func (c *container) holdStdio(ctx context.Context) {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	if len(c.held) > 0 {
		return
	}
	for _, path := range []string{c.req.Stdout, c.req.Stderr} {
		if path == "" || strings.Contains(path, "://") {
			continue
		}
		if fi, err := os.Stat(path); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
			continue
		}
		// Non-blocking: with the reader gone (containerd restarting) there is nothing to keep.
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			log.G(ctx).WithError(err).WithField("fifo", path).Debug("not holding a stdio FIFO")
			continue
		}
		c.held = append(c.held, f)
	}
}

// releaseStdio closes what holdStdio opened.
func (c *container) releaseStdio() {
	c.heldMu.Lock()
	defer c.heldMu.Unlock()
	for _, f := range c.held {
		f.Close()
	}
	c.held = nil
}

func newContainer(ns string, req *taskAPI.CreateTaskRequest, opts *options.Options, spec bundleSpec) *container {
	return &container{
		id:        req.ID,
		namespace: ns,
		req:       *req,
		opts:      opts,
		spec:      spec,
		dir:       containerDir(ns, req.ID),
		state:     StateCreated,
		hidden:    map[int]bool{},
		exited:    make(chan struct{}),
	}
}

// snapshot is a consistent read of what RPCs answer from.
type snapshot struct {
	state   State
	dumping bool
	rc      *runc.Container
	pid     int
}

func (c *container) snap() snapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	return snapshot{state: c.state, dumping: c.dumping, rc: c.rc, pid: c.pid}
}

// OpResult is the answer to a checkpoint or restore, and the last one is part of every state.
type OpResult struct {
	Op        string             `json:"op"`
	OK        bool               `json:"ok"`
	State     State              `json:"state"` // after the operation
	Pid       int                `json:"pid"`   // host pid of the container's init; 0 unless running
	Images    string             `json:"images,omitempty"`
	TimingsMs map[string]float64 `json:"timings_ms"`
	Error     string             `json:"error,omitempty"`
	// Kind is the error's class: failed_precondition (not in a state for the verb), not_found
	// (a restore without images), invalid_argument, canceled, failed (runc or CRIU).
	Kind string `json:"kind,omitempty"`
	// CriuError is CRIU's first "Error (" line: the cause; later ones are the unwinding.
	CriuError string    `json:"criu_error,omitempty"`
	CriuLog   string    `json:"criu_log,omitempty"`
	At        time.Time `json:"at"`
}

// bundleSpec is what the agent needs from the container's OCI spec to find it: the pod it
// belongs to (the CRI plugin's annotations) and the network namespace it joins.
type bundleSpec struct {
	Annotations map[string]string
	Netns       string
}

// Annotations of the OCI spec that the state verb passes on: the CRI plugin's (pod namespace and
// name, container name and type, sandbox id) and zeroproxy's own, if containerd passes them.
var statePrefixes = []string{"io.kubernetes.cri.", "zeroproxy.io/"}

// readBundleSpec reads config.json of a bundle; only the fields bundleSpec keeps.
func readBundleSpec(bundle string) (bundleSpec, error) {
	var doc struct {
		Annotations map[string]string `json:"annotations"`
		Linux       *struct {
			Namespaces []struct {
				Type string `json:"type"`
				Path string `json:"path"`
			} `json:"namespaces"`
		} `json:"linux"`
	}
	path := filepath.Join(bundle, "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return bundleSpec{}, err
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return bundleSpec{}, fmt.Errorf("%s: %w", path, err)
	}
	spec := bundleSpec{Annotations: map[string]string{}}
	for k, v := range doc.Annotations {
		for _, prefix := range statePrefixes {
			if strings.HasPrefix(k, prefix) {
				spec.Annotations[k] = v
			}
		}
	}
	if doc.Linux != nil {
		for _, ns := range doc.Linux.Namespaces {
			if ns.Type == "network" {
				spec.Netns = ns.Path
			}
		}
	}
	return spec, nil
}

// StateReply is the answer to the state verb.
type StateReply struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Bundle    string `json:"bundle"`
	// Netns is the network namespace path of the OCI spec: the sandbox's file for a pod's
	// sandbox, /proc/<sandbox pid>/ns/net for its containers under the CRI plugin, "" when the
	// container has a network namespace of its own.
	Netns       string            `json:"netns"`
	Annotations map[string]string `json:"annotations"`
	State       State             `json:"state"`
	Dumping     bool              `json:"dumping"`
	Pid         int               `json:"pid"` // 0 unless a process exists
	Images      string            `json:"images,omitempty"`
	Checkpoints int               `json:"checkpoints"`
	Restores    int               `json:"restores"`
	Last        *OpResult         `json:"last,omitempty"`
}

func (c *container) stateReply() StateReply {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := StateReply{ID: c.id, Namespace: c.namespace, Bundle: c.req.Bundle, Netns: c.spec.Netns,
		Annotations: c.spec.Annotations, State: c.state, Dumping: c.dumping,
		Checkpoints: c.checkpoints, Restores: c.restores, Last: c.last}
	if c.rc != nil && c.state == StateRunning {
		r.Pid = c.pid
	}
	if c.state.scaledDown() {
		r.Images = imagesPath(c.dir)
	}
	return r
}
