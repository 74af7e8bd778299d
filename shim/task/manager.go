package task

import (
	"context"
	"os"

	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/shutdown"
	"github.com/containerd/containerd/plugin"
	"github.com/containerd/containerd/runtime/v2/runc/manager"
	"github.com/containerd/containerd/runtime/v2/shim"
)

// Manager is runc's shim manager (how the shim binary starts itself, one per pod sandbox, and how
// `delete` cleans up after a dead shim) plus the clean-up of what only this shim creates.
type Manager struct {
	shim.Manager
}

// NewManager returns the manager for the runtime called name.
func NewManager(name string) shim.Manager {
	return Manager{manager.NewShimManager(name)}
}

// Stop runs when containerd deletes a container whose shim is gone (crashed or killed): runc's
// part, then this container's checkpoint images and control socket, which would otherwise leak.
func (m Manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	st, err := m.Manager.Stop(ctx, id)
	if ns, nerr := namespaces.NamespaceRequired(ctx); nerr == nil {
		if rerr := os.RemoveAll(containerDir(ns, id)); rerr != nil {
			log.G(ctx).WithError(rerr).Warn("removing checkpoint images")
		}
	}
	if rerr := os.Remove(SocketPath(id)); rerr != nil && !os.IsNotExist(rerr) {
		log.G(ctx).WithError(rerr).Warn("removing control socket")
	}
	return st, err
}

func init() {
	plugin.Register(&plugin.Registration{
		Type:     plugin.TTRPCPlugin,
		ID:       "task",
		Requires: []plugin.Type{plugin.EventPlugin, plugin.InternalPlugin},
		InitFn: func(ic *plugin.InitContext) (interface{}, error) {
			pub, err := ic.GetByID(plugin.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			sd, err := ic.GetByID(plugin.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			return newService(ic.Context, pub.(shim.Publisher), sd.(shutdown.Service))
		},
	})
}
