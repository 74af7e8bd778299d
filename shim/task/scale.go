package task

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/process"
	"github.com/containerd/containerd/runtime/v2/runc"
	taskAPI "github.com/containerd/containerd/runtime/v2/task"
	"golang.org/x/sys/unix"
)

// How long a checkpoint waits for the dumped init's exit to be reaped. CRIU kills the tree at
// the end of the dump, so it comes within milliseconds; the bound only keeps a lost SIGCHLD from
// hanging the verb (the pid is then remembered and its exit dropped whenever it comes).
const reapWait = 10 * time.Second

func imagesPath(dir string) string { return filepath.Join(dir, "checkpoint") }
func workPath(dir string) string   { return filepath.Join(dir, "work") }

func msSince(t time.Time) float64 { return float64(time.Since(t).Microseconds()) / 1000 }

// restoreDeadline bounds one restore (runc restore, CRIU, opening the stdio FIFOs).
const restoreDeadline = 2 * time.Minute

// opContext is the context of a checkpoint or restore: the container's namespace, and not the
// control request's, so a client hanging up cannot kill runc halfway through a dump.
func (c *container) opContext() context.Context {
	return namespaces.WithNamespace(context.Background(), c.namespace)
}

// checkpoint dumps the container's processes to disk and lets them go, keeping the container
// Running to containerd. Refused unless running with no exec'd process alive: an exec'd process
// would be dumped with the tree but its shim bookkeeping could not follow it.
func (s *service) checkpoint(c *container, tcpEstablished bool) (*OpResult, error) {
	c.op.Lock()
	defer c.op.Unlock()
	ctx := c.opContext()
	start := time.Now()
	res := &OpResult{Op: "checkpoint", TimingsMs: map[string]float64{}, At: start}

	c.mu.Lock()
	rc := c.rc
	if c.state != StateRunning || rc == nil || c.dumping {
		st := c.state
		c.mu.Unlock()
		return s.finish(c, res, fmt.Errorf("container %s is %s, not running: %w", c.id, st, errdefs.ErrFailedPrecondition))
	}
	c.mu.Unlock()
	for _, p := range rc.ExecdProcesses() {
		if st, err := p.Status(ctx); err != nil || st != "stopped" {
			return s.finish(c, res, fmt.Errorf("container %s has exec'd process %s (%s): %w", c.id, p.ID(), st,
				errdefs.ErrFailedPrecondition))
		}
	}
	p, err := rc.Process("")
	if err != nil {
		return s.finish(c, res, err)
	}
	ip := p.(*process.Init)
	pid := ip.Pid()

	next := imagesPath(c.dir) + ".new"
	work := workPath(c.dir)
	if err := os.RemoveAll(next); err != nil {
		return s.finish(c, res, err)
	}
	if err := os.MkdirAll(work, 0o700); err != nil {
		return s.finish(c, res, err)
	}
	c.mu.Lock()
	c.dumping = true
	c.initGone = make(chan struct{})
	c.pending = nil
	gone := c.initGone
	c.mu.Unlock()

	// Before the dump: the dumped process's exit closes the shim's own writers of the FIFOs,
	// and the CRI plugin's reader would see EOF at once and stop copying into the pod's log.
	c.holdStdio(ctx)
	t := time.Now()
	err = ip.Checkpoint(ctx, &process.CheckpointConfig{
		Path:         next,
		Exit:         true, // not --leave-running: the point is that the process goes
		AllowOpenTCP: tcpEstablished,
		WorkDir:      work, // kept, so dump.log can be read after a failure
	})
	res.TimingsMs["dump"] = msSince(t)
	if err != nil {
		c.mu.Lock()
		c.dumping = false
		pending := c.pending
		c.pending = nil
		c.mu.Unlock()
		if pending != nil {
			s.notes <- exitNote{exit: *pending} // it did exit: an ordinary exit after all
		}
		_ = os.RemoveAll(next)
		c.releaseStdio() // still running (or exited for real): its own writers are the ones that count
		res.CriuLog = filepath.Join(work, "dump.log")
		res.CriuError = criuError(res.CriuLog)
		return s.finish(c, res, fmt.Errorf("checkpoint of %s: %w", c.id, err))
	}

	// The pid can only be forgotten once its exit has been reaped (and dropped): a restored
	// process could otherwise get the same pid and be taken for it.
	t = time.Now()
	select {
	case <-gone:
	case <-time.After(reapWait):
		log.G(ctx).WithField("pid", pid).Warn("dumped init's exit not reaped yet; it will be dropped when it comes")
		c.mu.Lock()
		c.hidden[pid] = true
		c.mu.Unlock()
	}
	res.TimingsMs["reap"] = msSince(t)

	// The new images replace the old ones only now, so a failed dump never destroys a good image.
	t = time.Now()
	if err := os.RemoveAll(imagesPath(c.dir)); err != nil {
		log.G(ctx).WithError(err).Warn("removing previous images")
	}
	renameErr := os.Rename(next, imagesPath(c.dir))
	// runc has forgotten the container; what is left is the shim's side of the process: its
	// stdio pipes and the rootfs mount. The process is over as far as that bookkeeping goes.
	ip.SetExited(128 + int(unix.SIGKILL))
	if _, err := rc.Delete(ctx, &taskAPI.DeleteRequest{ID: c.id}); err != nil {
		log.G(ctx).WithError(err).Warn("releasing the dumped process's stdio and rootfs")
	}
	res.TimingsMs["release"] = msSince(t)

	c.mu.Lock()
	c.dumping = false
	c.pending = nil
	c.rc = nil
	c.state = StateCheckpointed
	c.checkpoints++
	c.mu.Unlock()
	if renameErr != nil {
		// The process is gone and the images are in .new; a restore would not find them.
		c.mu.Lock()
		c.state = StateFailed
		c.mu.Unlock()
		return s.finish(c, res, fmt.Errorf("checkpoint of %s: moving images into place: %w", c.id, renameErr))
	}
	res.Images = imagesPath(c.dir)
	res.TimingsMs["total"] = msSince(start)
	return s.finish(c, res, nil)
}

// restore brings a scaled-down container back in place from its images and tracks the new
// process as the container's init. The caller holds c.op.
func (s *service) restoreLocked(c *container) (*OpResult, error) {
	// Bounded: opening the stdio FIFOs blocks until their reader is there, and a restore that
	// never returns would keep the container's operation lock for good.
	ctx, cancel := context.WithTimeout(c.opContext(), restoreDeadline)
	defer cancel()
	start := time.Now()
	res := &OpResult{Op: "restore", TimingsMs: map[string]float64{}, At: start}

	c.mu.Lock()
	if !(c.state == StateCheckpointed || c.state == StateFailed) || c.killing {
		st := c.state
		c.mu.Unlock()
		return s.finish(c, res, fmt.Errorf("container %s is %s, not checkpointed: %w", c.id, st, errdefs.ErrFailedPrecondition))
	}
	c.state = StateRestoring
	c.early = nil
	c.mu.Unlock()

	fail := func(err error) (*OpResult, error) {
		c.mu.Lock()
		c.state = StateFailed
		c.early = nil
		c.mu.Unlock()
		return s.finish(c, res, err)
	}
	images := imagesPath(c.dir)
	if _, err := os.Stat(filepath.Join(images, "inventory.img")); err != nil {
		return fail(fmt.Errorf("restore of %s: no checkpoint images in %s: %w", c.id, images, errdefs.ErrNotFound))
	}
	opts := *c.opts
	opts.CriuWorkPath = workPath(c.dir) // restore.log stays there, next to dump.log
	anyOpts, err := marshalOptions(&opts)
	if err != nil {
		return fail(err)
	}
	req := c.req
	req.Checkpoint = images
	req.ParentCheckpoint = ""
	req.Options = anyOpts

	// A snapshotter rootfs is still mounted from before (runc never unmounts it; releasing the
	// dumped process did); NewContainer mounts it again, so make sure it is not stacked.
	if len(req.Rootfs) > 0 {
		if err := mount.UnmountAll(filepath.Join(req.Bundle, "rootfs"), 0); err != nil {
			log.G(ctx).WithError(err).Warn("unmounting the old rootfs before a restore")
		}
	}
	t := time.Now()
	rc, err := runc.NewContainer(ctx, s.platform, &req)
	if err == nil {
		if _, err = rc.Start(ctx, &taskAPI.StartRequest{ID: c.id}); err != nil {
			if _, derr := rc.Delete(ctx, &taskAPI.DeleteRequest{ID: c.id}); derr != nil {
				log.G(ctx).WithError(derr).Warn("cleaning up after a failed restore")
			}
		}
	}
	res.TimingsMs["restore"] = msSince(t)
	if err != nil {
		res.CriuLog = filepath.Join(workPath(c.dir), "restore.log")
		res.CriuError = criuError(res.CriuLog)
		return fail(fmt.Errorf("restore of %s: %w", c.id, err))
	}
	pid := rc.Pid()
	s.watchOOM(ctx, c.id, rc)

	c.releaseStdio() // the restored process writes to them now
	c.mu.Lock()
	c.rc = rc
	c.pid = pid
	c.state = StateRunning
	c.restores++
	early := c.early
	c.early = nil
	c.mu.Unlock()
	for _, e := range early {
		if e.Pid == pid {
			s.notes <- exitNote{exit: e} // it exited before we knew its pid: deliver it now
		}
	}
	res.Pid = pid
	res.TimingsMs["total"] = msSince(start)
	return s.finish(c, res, nil)
}

func (s *service) restore(c *container) (*OpResult, error) {
	c.op.Lock()
	defer c.op.Unlock()
	return s.restoreLocked(c)
}

// finish records the outcome as the container's last operation.
func (s *service) finish(c *container, res *OpResult, err error) (*OpResult, error) {
	if _, ok := res.TimingsMs["total"]; !ok {
		res.TimingsMs["total"] = msSince(res.At)
	}
	c.mu.Lock()
	res.OK = err == nil
	res.State = c.state
	if c.state == StateRunning && c.rc != nil {
		res.Pid = c.pid
	} else {
		res.Pid = 0
	}
	if err != nil {
		// One line: it goes to logs, metrics and Kubernetes Events (runc's own message has a
		// line break before the CRIU log's path).
		res.Error = strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
		res.Kind = errKind(err)
	}
	c.last = res
	c.mu.Unlock()
	level := log.G(context.Background()).WithField("id", c.id).WithField("op", res.Op).WithField("ms", res.TimingsMs["total"])
	if err != nil {
		level.WithError(err).WithField("criu", res.CriuError).Warn("scale operation failed")
	} else {
		level.Info("scale operation done")
	}
	return res, err
}

// stopSignals end a scaled-down container without a restore: they are what a stop sends, and
// the app cannot tell a kill while dumped from one a moment before.
func stopSignal(sig uint32) bool {
	switch unix.Signal(sig) {
	case unix.SIGKILL, unix.SIGTERM, unix.SIGINT, unix.SIGQUIT:
		return true
	}
	return false
}

// killScaledDown handles a signal to a scaled-down init. The caller holds c.op. Returns handled
// = false when the signal needs a live process (the caller restores first).
func (s *service) killScaledDown(c *container, sig uint32) (handled bool) {
	if sig == 0 {
		return true // "does it exist": it does, as far as containerd is concerned
	}
	if !stopSignal(sig) {
		return false
	}
	c.mu.Lock()
	first := !c.killing
	c.killing = true
	c.mu.Unlock()
	if first {
		// The exit goes through the one place exits are published, like a real one.
		s.notes <- exitNote{killed: c, status: 128 + int(sig)}
	}
	return true
}

// criuError is the first real error line of a CRIU log. CRIU always logs an rlimit error on these
// machines, which is harmless and skipped.
func criuError(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "Error ("); i >= 0 && !strings.Contains(line, "rlimit") {
			return line[i:]
		}
	}
	return ""
}

// errKind names an error's errdefs kind for the control API.
func errKind(err error) string {
	switch {
	case err == nil:
		return ""
	case errdefs.IsFailedPrecondition(err):
		return "failed_precondition"
	case errdefs.IsNotFound(err):
		return "not_found"
	case errdefs.IsInvalidArgument(err):
		return "invalid_argument"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "canceled"
	}
	return "failed"
}
