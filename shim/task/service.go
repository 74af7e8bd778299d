// Package task is the task service of containerd-shim-zeroproxy-v2: runc containers, as
// containerd's runc shim runs them, that can also be checkpointed to disk with the process gone
// and restored in place while containerd (and the kubelet above it) keep seeing them Running.
//
// It is built on containerd's exported runc packages (runtime/v2/runc, pkg/process, pkg/stdio,
// sys/reaper); what it adds is the scaled-down state: exits of dumped processes are dropped,
// State/Pids/Stats answer for a process that is on disk, a restore becomes the container's new
// init, Exec restores first, and a stop while scaled down is a real TaskExit. The verbs that
// trigger checkpoint and restore come from zeroproxy's agent over a control socket (control.go).
package task

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/containerd/cgroups"
	cgroupsv1stats "github.com/containerd/cgroups/stats/v1"
	cgroupsv2 "github.com/containerd/cgroups/v2"
	cgroupsv2stats "github.com/containerd/cgroups/v2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	apitask "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/oom"
	oomv1 "github.com/containerd/containerd/pkg/oom/v1"
	oomv2 "github.com/containerd/containerd/pkg/oom/v2"
	"github.com/containerd/containerd/pkg/process"
	"github.com/containerd/containerd/pkg/shutdown"
	"github.com/containerd/containerd/pkg/stdio"
	"github.com/containerd/containerd/runtime/v2/runc"
	"github.com/containerd/containerd/runtime/v2/runc/options"
	"github.com/containerd/containerd/runtime/v2/shim"
	taskAPI "github.com/containerd/containerd/runtime/v2/task"
	"github.com/containerd/containerd/sys/reaper"
	runcC "github.com/containerd/go-runc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl"
	ptypes "github.com/gogo/protobuf/types"
)

var (
	_     taskAPI.TaskService = (*service)(nil)
	empty                     = &ptypes.Empty{}
)

type service struct {
	ctx      context.Context
	platform stdio.Platform
	oom      oom.Watcher
	shutdown shutdown.Service

	ec     chan runcC.Exit  // from the reaper
	notes  chan exitNote    // to the exit loop from operations
	events chan interface{} // to containerd, in order
	// sendMu makes a start's event go out before the exit of the process it started.
	sendMu sync.Mutex

	mu         sync.Mutex
	containers map[string]*container
}

func newService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service) (taskAPI.TaskService, error) {
	var (
		w   oom.Watcher
		err error
	)
	if cgroups.Mode() == cgroups.Unified {
		w, err = oomv2.New(publisher)
	} else {
		w, err = oomv1.New(publisher)
	}
	if err != nil {
		return nil, err
	}
	go w.Run(ctx)
	platform, err := runc.NewPlatform()
	if err != nil {
		return nil, fmt.Errorf("console platform: %w", err)
	}
	s := &service{
		ctx:        ctx,
		platform:   platform,
		oom:        w,
		shutdown:   sd,
		ec:         reaper.Default.Subscribe(),
		notes:      make(chan exitNote, 128),
		events:     make(chan interface{}, 128),
		containers: map[string]*container{},
	}
	// go-runc must wait for runc through the reaper, which otherwise takes runc's exit status.
	runcC.Monitor = reaper.Default
	go s.handleExits()
	go s.forward(ctx, publisher)
	sd.RegisterCallback(func(context.Context) error { return platform.Close() })
	sd.RegisterCallback(func(context.Context) error {
		close(s.events)
		return nil
	})
	if address, err := shim.ReadAddress("address"); err == nil {
		sd.RegisterCallback(func(context.Context) error { return shim.RemoveSocket(address) })
	}
	return s, nil
}

// RegisterTTRPC serves the task API to containerd.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTaskService(server, s)
	return nil
}

func (s *service) get(id string) (*container, error) {
	s.mu.Lock()
	c := s.containers[id]
	s.mu.Unlock()
	if c == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "container %s not created", id)
	}
	return c, nil
}

func (s *service) send(evt interface{}) {
	s.sendMu.Lock()
	s.events <- evt
	s.sendMu.Unlock()
}

func (s *service) watchOOM(ctx context.Context, id string, rc *runc.Container) {
	cg := rc.Cgroup()
	if cg == nil {
		return
	}
	if m, ok := cg.(*cgroupsv2.Manager); ok {
		if ctrls, err := m.RootControllers(); err == nil {
			if err := m.ToggleControllers(ctrls, cgroupsv2.Enable); err != nil {
				log.G(ctx).WithError(err).Debug("enabling cgroup v2 controllers")
			}
		}
	}
	if err := s.oom.Add(id, cg); err != nil {
		log.G(ctx).WithError(err).Warn("adding the cgroup to the OOM watcher")
	}
}

// Create makes the container and its (not yet started) init, and its control socket.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	if s.containers[r.ID] != nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "container %s", r.ID)
	}
	opts, err := runcOptions(r.Options)
	if err != nil {
		return nil, errdefs.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	anyOpts, err := marshalOptions(opts)
	if err != nil {
		return nil, err
	}
	spec, err := readBundleSpec(r.Bundle)
	if err != nil {
		return nil, errdefs.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	req := *r
	req.Options = anyOpts
	c := newContainer(ns, &req, opts, spec)
	if err := s.serveControl(c); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	rc, err := runc.NewContainer(ctx, s.platform, &req)
	if err != nil {
		s.stopControl(c)
		return nil, err
	}
	c.rc = rc
	c.pid = rc.Pid()
	s.containers[r.ID] = c
	s.send(&eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Checkpoint:  r.Checkpoint,
		Pid:         uint32(rc.Pid()),
	})
	return &taskAPI.CreateTaskResponse{Pid: uint32(rc.Pid())}, nil
}

// Start starts the init or an exec'd process.
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	rc := c.snap().rc
	if rc == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s is scaled down", r.ID)
	}
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	p, err := rc.Start(ctx, r)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	if r.ExecID == "" {
		c.mu.Lock()
		c.pid = p.Pid()
		if c.state == StateCreated {
			c.state = StateRunning
		}
		c.mu.Unlock()
		s.watchOOM(ctx, c.id, rc)
		s.events <- &eventstypes.TaskStart{ContainerID: c.id, Pid: uint32(p.Pid())}
	} else {
		s.events <- &eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: uint32(p.Pid())}
	}
	return &taskAPI.StartResponse{Pid: uint32(p.Pid())}, nil
}

// Delete removes an exec'd process, or the container with its images and control socket.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID != "" {
		rc := c.snap().rc
		if rc == nil {
			return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %s of %s", r.ExecID, r.ID)
		}
		p, err := rc.Delete(ctx, r)
		if err != nil {
			return nil, errdefs.ToGRPC(err)
		}
		return &taskAPI.DeleteResponse{ExitStatus: uint32(p.ExitStatus()), ExitedAt: p.ExitedAt(), Pid: uint32(p.Pid())}, nil
	}
	c.op.Lock()
	defer c.op.Unlock()
	sn := c.snap()
	var resp *taskAPI.DeleteResponse
	if sn.rc != nil {
		p, err := sn.rc.Delete(ctx, r)
		if err != nil {
			return nil, errdefs.ToGRPC(err)
		}
		resp = &taskAPI.DeleteResponse{ExitStatus: uint32(p.ExitStatus()), ExitedAt: p.ExitedAt(), Pid: uint32(p.Pid())}
	} else {
		if sn.state != StateStopped {
			return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition,
				"container %s is %s (Running to containerd): kill it before deleting", r.ID, sn.state)
		}
		c.mu.Lock()
		resp = &taskAPI.DeleteResponse{ExitStatus: uint32(c.status), ExitedAt: c.exitedAt, Pid: uint32(c.pid)}
		c.mu.Unlock()
	}
	s.stopControl(c)
	c.releaseStdio()
	if err := os.RemoveAll(c.dir); err != nil {
		log.G(ctx).WithError(err).Warn("removing checkpoint images")
	}
	s.mu.Lock()
	delete(s.containers, r.ID)
	s.mu.Unlock()
	s.send(&eventstypes.TaskDelete{ContainerID: c.id, Pid: resp.Pid, ExitStatus: resp.ExitStatus, ExitedAt: resp.ExitedAt})
	return resp, nil
}

// Exec adds a process; a scaled-down container is restored first, since the new process has to
// run beside the app.
func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*ptypes.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	if c.snap().state.scaledDown() {
		if _, err := s.restoreLocked(c); err != nil {
			return nil, errdefs.ToGRPC(err)
		}
	}
	rc := c.snap().rc
	if rc == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s has no process", r.ID)
	}
	ok, cancel := rc.ReserveProcess(r.ExecID)
	if !ok {
		return nil, errdefs.ToGRPCf(errdefs.ErrAlreadyExists, "id %s", r.ExecID)
	}
	p, err := rc.Exec(ctx, r)
	if err != nil {
		cancel()
		return nil, errdefs.ToGRPC(err)
	}
	s.send(&eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: p.ID()})
	return empty, nil
}

// ResizePty of a process.
func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*ptypes.Empty, error) {
	rc, err := s.live(r.ID)
	if err != nil {
		return nil, err
	}
	if err := rc.ResizePty(ctx, r); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return empty, nil
}

// live is the runc container of a container that has a process, for the RPCs that need one.
func (s *service) live(id string) (*runc.Container, error) {
	c, err := s.get(id)
	if err != nil {
		return nil, err
	}
	sn := c.snap()
	if sn.rc == nil || sn.dumping {
		return nil, errdefs.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s is %s", id, scaledWord(sn))
	}
	return sn.rc, nil
}

func scaledWord(sn snapshot) string {
	if sn.dumping {
		return "being checkpointed"
	}
	return string(sn.state)
}

// State answers Running for a scaled-down init: to containerd the container never stopped.
func (s *service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	sn := c.snap()
	if r.ExecID == "" && (sn.rc == nil || sn.dumping) {
		resp := &taskAPI.StateResponse{
			ID: c.id, Bundle: c.req.Bundle, Pid: uint32(sn.pid), Status: apitask.StatusRunning,
			Stdin: c.req.Stdin, Stdout: c.req.Stdout, Stderr: c.req.Stderr, Terminal: c.req.Terminal,
		}
		if sn.state == StateStopped {
			c.mu.Lock()
			resp.Status, resp.ExitStatus, resp.ExitedAt = apitask.StatusStopped, uint32(c.status), c.exitedAt
			c.mu.Unlock()
		}
		return resp, nil
	}
	if sn.rc == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %s of %s", r.ExecID, r.ID)
	}
	p, err := sn.rc.Process(r.ExecID)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	st, err := p.Status(ctx)
	if err != nil {
		return nil, err
	}
	status := map[string]apitask.Status{
		"created": apitask.StatusCreated, "running": apitask.StatusRunning, "stopped": apitask.StatusStopped,
		"paused": apitask.StatusPaused, "pausing": apitask.StatusPausing,
	}[st]
	sio := p.Stdio()
	return &taskAPI.StateResponse{
		ID: p.ID(), Bundle: sn.rc.Bundle, Pid: uint32(p.Pid()), Status: status,
		Stdin: sio.Stdin, Stdout: sio.Stdout, Stderr: sio.Stderr, Terminal: sio.Terminal,
		ExitStatus: uint32(p.ExitStatus()), ExitedAt: p.ExitedAt(),
	}, nil
}

// Pause the container.
func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	rc, err := s.live(r.ID)
	if err != nil {
		return nil, err
	}
	if err := rc.Pause(ctx); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	s.send(&eventstypes.TaskPaused{ContainerID: r.ID})
	return empty, nil
}

// Resume the container.
func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	rc, err := s.live(r.ID)
	if err != nil {
		return nil, err
	}
	if err := rc.Resume(ctx); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	s.send(&eventstypes.TaskResumed{ContainerID: r.ID})
	return empty, nil
}

// Kill signals a process. A stop signal to a scaled-down init ends it without a restore; any
// other signal restores it first, so the app gets it.
func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*ptypes.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID == "" {
		c.op.Lock()
		defer c.op.Unlock()
		sn := c.snap()
		if sn.state.scaledDown() {
			if s.killScaledDown(c, r.Signal) {
				return empty, nil
			}
			if _, err := s.restoreLocked(c); err != nil {
				return nil, errdefs.ToGRPC(err)
			}
		}
	}
	rc := c.snap().rc
	if rc == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process already finished")
	}
	if err := rc.Kill(ctx, r); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return empty, nil
}

// Pids lists the container's processes: none while it is on disk.
func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	sn := c.snap()
	if sn.rc == nil || sn.dumping {
		return &taskAPI.PidsResponse{}, nil
	}
	p, err := sn.rc.Process("")
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	pids, err := p.(*process.Init).Runtime().Ps(ctx, r.ID)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	execs := map[int]string{}
	for _, ep := range sn.rc.ExecdProcesses() {
		execs[ep.Pid()] = ep.ID()
	}
	out := make([]*apitask.ProcessInfo, 0, len(pids))
	for _, pid := range pids {
		info := &apitask.ProcessInfo{Pid: uint32(pid)}
		if id, ok := execs[pid]; ok {
			a, err := typeurl.MarshalAny(&options.ProcessDetails{ExecID: id})
			if err != nil {
				return nil, fmt.Errorf("process %d of %s: %w", pid, r.ID, err)
			}
			info.Info = a
		}
		out = append(out, info)
	}
	return &taskAPI.PidsResponse{Processes: out}, nil
}

// CloseIO closes a process's stdin; a scaled-down init's stdin is already closed.
func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*ptypes.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	rc := c.snap().rc
	if rc == nil {
		return empty, nil
	}
	if err := rc.CloseIO(ctx, r); err != nil {
		return nil, err
	}
	return empty, nil
}

// Checkpoint is containerd's own checkpoint (`ctr c checkpoint`): runc's, unchanged. zeroproxy's
// scale-down goes through the control socket instead, because containerd's would report the
// process stopped.
func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	c.op.Lock()
	defer c.op.Unlock()
	rc, err := s.live(r.ID)
	if err != nil {
		return nil, err
	}
	if err := rc.Checkpoint(ctx, r); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return empty, nil
}

// Update a running container's resources.
func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*ptypes.Empty, error) {
	rc, err := s.live(r.ID)
	if err != nil {
		return nil, err
	}
	if err := rc.Update(ctx, r); err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	return empty, nil
}

// Wait blocks until the process really exits; checkpoints and restores in between do not count.
func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID == "" {
		select {
		case <-c.exited:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		return &taskAPI.WaitResponse{ExitStatus: uint32(c.status), ExitedAt: c.exitedAt}, nil
	}
	rc := c.snap().rc
	if rc == nil {
		return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "process %s of %s", r.ExecID, r.ID)
	}
	p, err := rc.Process(r.ExecID)
	if err != nil {
		return nil, errdefs.ToGRPC(err)
	}
	p.Wait()
	return &taskAPI.WaitResponse{ExitStatus: uint32(p.ExitStatus()), ExitedAt: p.ExitedAt()}, nil
}

// Stats of the container's cgroup; empty while scaled down (runc removed the cgroup with the
// process, and the kubelet must not take a missing cgroup for a dead container).
func (s *service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	sn := c.snap()
	var stats interface{}
	if sn.rc == nil || sn.dumping {
		if cgroups.Mode() == cgroups.Unified {
			stats = &cgroupsv2stats.Metrics{}
		} else {
			stats = &cgroupsv1stats.Metrics{}
		}
	} else {
		switch cg := sn.rc.Cgroup().(type) {
		case nil:
			return nil, errdefs.ToGRPCf(errdefs.ErrNotFound, "cgroup of %s does not exist", r.ID)
		case cgroups.Cgroup:
			if stats, err = cg.Stat(cgroups.IgnoreNotExist); err != nil {
				return nil, err
			}
		case *cgroupsv2.Manager:
			if stats, err = cg.Stat(); err != nil {
				return nil, err
			}
		default:
			return nil, errdefs.ToGRPCf(errdefs.ErrNotImplemented, "cgroup type %T", cg)
		}
	}
	data, err := typeurl.MarshalAny(stats)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: data}, nil
}

// Connect returns the shim's and the init's pids.
func (s *service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	var pid int
	if c, err := s.get(r.ID); err == nil {
		pid = c.snap().pid
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: uint32(pid)}, nil
}

// Shutdown ends the shim once it serves no container.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.containers) > 0 {
		return empty, nil
	}
	s.shutdown.Shutdown()
	return empty, nil
}
