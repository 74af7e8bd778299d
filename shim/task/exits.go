package task

import (
	"context"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/process"
	"github.com/containerd/containerd/runtime/v2/runc"
	"github.com/containerd/containerd/runtime/v2/shim"
	runcC "github.com/containerd/go-runc"
)

// exitNote is something for the exit loop that did not come from the reaper: an exit seen too
// early and handed back, or the end of a scaled-down container killed by a stop signal.
type exitNote struct {
	exit   runcC.Exit
	killed *container
	status int
}

// handleExits is the one place exits become state and TaskExit events. Exits flow one way:
// reaper → here → the event forwarder; a checkpointed process is a state this loop consults.
func (s *service) handleExits() {
	for {
		select {
		case e, ok := <-s.ec:
			if !ok {
				return
			}
			s.onExit(e)
		case n := <-s.notes:
			if n.killed != nil {
				s.onScaledDownKill(n.killed, n.status)
			} else {
				s.onExit(n.exit)
			}
		}
	}
}

func (s *service) onExit(e runcC.Exit) {
	s.mu.Lock()
	all := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		all = append(all, c)
	}
	s.mu.Unlock()
	for _, c := range all {
		if s.claimExit(c, e) {
			return
		}
	}
	// Most unknown pids are runc's own commands. During a restore it may also be the restored
	// init, exiting before the restore has read its pid; the restore checks these.
	for _, c := range all {
		c.mu.Lock()
		if c.state == StateRestoring {
			c.early = append(c.early, e)
		}
		c.mu.Unlock()
	}
}

// claimExit handles e if it belongs to c.
func (s *service) claimExit(c *container, e runcC.Exit) bool {
	c.mu.Lock()
	if c.hidden[e.Pid] {
		delete(c.hidden, e.Pid)
		c.mu.Unlock()
		return true
	}
	rc := c.rc
	if rc == nil || !rc.HasPid(e.Pid) {
		c.mu.Unlock()
		return false
	}
	if e.Pid == rc.Pid() && c.dumping {
		// CRIU's kill at the end of the dump (or a real exit, if the dump then fails: kept).
		ee := e
		c.pending = &ee
		if c.initGone != nil {
			close(c.initGone)
			c.initGone = nil
		}
		c.mu.Unlock()
		return true
	}
	c.mu.Unlock()

	for _, p := range rc.All() {
		if p.Pid() != e.Pid {
			continue
		}
		if ip, ok := p.(*process.Init); ok {
			// Without its own PID namespace the init's children outlive it; runc kills them.
			if runc.ShouldKillAllOnExit(s.ctx, rc.Bundle) {
				if err := ip.KillAll(s.ctx); err != nil {
					log.G(s.ctx).WithError(err).WithField("id", ip.ID()).Error("killing init's children")
				}
			}
		}
		p.SetExited(e.Status)
		if p.ID() == c.id {
			c.mu.Lock()
			c.markExited(e.Status, p.ExitedAt())
			c.mu.Unlock()
		}
		s.sendExit(c.id, p.ID(), e.Pid, e.Status, p.ExitedAt())
		return true
	}
	return true
}

// onScaledDownKill ends a container whose process is on disk: it exits with the signal's status,
// as the process would have.
func (s *service) onScaledDownKill(c *container, status int) {
	c.mu.Lock()
	if c.state == StateStopped {
		c.mu.Unlock()
		return
	}
	now := time.Now()
	c.markExited(status, now)
	pid := c.pid
	c.mu.Unlock()
	s.sendExit(c.id, c.id, pid, status, now)
}

// markExited records the init's real exit; c.mu held.
func (c *container) markExited(status int, at time.Time) {
	c.releaseStdio() // the reader's EOF is the end of the log now
	c.state = StateStopped
	c.status = status
	c.exitedAt = at
	select {
	case <-c.exited:
	default:
		close(c.exited)
	}
}

func (s *service) sendExit(containerID, processID string, pid, status int, at time.Time) {
	s.sendMu.Lock()
	s.events <- &eventstypes.TaskExit{
		ContainerID: containerID,
		ID:          processID,
		Pid:         uint32(pid),
		ExitStatus:  uint32(status),
		ExitedAt:    at,
	}
	s.sendMu.Unlock()
}

// forward publishes events to containerd in the order they were queued.
func (s *service) forward(ctx context.Context, publisher shim.Publisher) {
	ns, _ := namespaces.Namespace(ctx)
	ctx = namespaces.WithNamespace(context.Background(), ns)
	for e := range s.events {
		if err := publisher.Publish(ctx, runc.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("publishing event")
		}
	}
	publisher.Close()
}
