package task

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/log"
)

// The control API: HTTP with JSON bodies on a unix socket per container, so the Python agent
// needs nothing beyond its standard library. Three verbs:
//
//	GET  /v1/state       → StateReply
//	POST /v1/checkpoint  {"tcp_established": false} → OpResult
//	POST /v1/restore     → OpResult
//
// A refused or failed verb answers an OpResult with ok=false, error (and CRIU's first error line),
// and the status 409 (not in a state for it), 404 (a restore without images), 400 (bad body) or
// 500 (runc or CRIU failed).

// CheckpointRequest is the body of POST /v1/checkpoint (optional).
type CheckpointRequest struct {
	// TCPEstablished dumps established connections too (runc --tcp-established). Without it a
	// container with an open connection refuses to checkpoint, which is what scale to zero wants.
	TCPEstablished bool `json:"tcp_established"`
}

func (s *service) serveControl(c *container) error {
	dir := SocketDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("control socket directory: %w", err)
	}
	path := SocketPath(c.id)
	if conn, err := net.DialTimeout("unix", path, time.Second); err == nil {
		conn.Close()
		return fmt.Errorf("control socket %s is served by another shim: %w", path, errdefs.ErrAlreadyExists)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("stale control socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/state", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, c.stateReply())
	})
	mux.HandleFunc("POST /v1/checkpoint", func(w http.ResponseWriter, r *http.Request) {
		var req CheckpointRequest
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<16))
		if err == nil && len(body) > 0 {
			dec := json.NewDecoder(bytes.NewReader(body))
			dec.DisallowUnknownFields()
			err = dec.Decode(&req)
		}
		if err != nil {
			reply(w, http.StatusBadRequest, &OpResult{Op: "checkpoint", State: c.snap().state,
				Error: fmt.Sprintf("checkpoint of %s: bad request body: %v", c.id, err), At: time.Now()})
			return
		}
		res, err := s.checkpoint(c, req.TCPEstablished)
		reply(w, statusOf(err), res)
	})
	mux.HandleFunc("POST /v1/restore", func(w http.ResponseWriter, _ *http.Request) {
		res, err := s.restore(c)
		reply(w, statusOf(err), res)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	c.server = srv
	go func() {
		if err := srv.Serve(l); err != nil && err != http.ErrServerClosed {
			log.G(s.ctx).WithError(err).WithField("id", c.id).Error("control socket stopped")
		}
	}()
	return nil
}

// stopControl closes the socket and its connections. A verb still waiting for the container's
// operation lock then finds the container gone and answers nothing.
func (s *service) stopControl(c *container) {
	if c.server != nil {
		if err := c.server.Close(); err != nil {
			log.G(s.ctx).WithError(err).WithField("id", c.id).Warn("closing control socket")
		}
		c.server = nil
	}
	if err := os.Remove(SocketPath(c.id)); err != nil && !os.IsNotExist(err) {
		log.G(s.ctx).WithError(err).Warn("removing control socket")
	}
}

func statusOf(err error) int {
	switch errKind(err) {
	case "":
		return http.StatusOK
	case "failed_precondition":
		return http.StatusConflict
	case "not_found":
		return http.StatusNotFound
	case "invalid_argument":
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func reply(w http.ResponseWriter, status int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.G(context.Background()).WithError(err).Debug("writing control reply")
	}
}
