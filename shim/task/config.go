package task

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/errdefs"
	runtimeoptions "github.com/containerd/containerd/pkg/runtimeoptions/v1"
	"github.com/containerd/containerd/runtime/v2/runc/options"
	"github.com/containerd/typeurl"
	ptypes "github.com/gogo/protobuf/types"
	"github.com/pelletier/go-toml"
)

// RuntimeName is what containerd's config and `ctr run --runtime` call this shim; containerd
// derives the binary name containerd-shim-zeroproxy-v2 from it.
const RuntimeName = "io.containerd.zeroproxy.v2"

// Host directories. The defaults are what the node agent mounts; tests point them at their own
// temporary directories through the environment of the containerd that starts the shim (the shim
// inherits it).
const (
	EnvSocketDir     = "ZP_SHIM_SOCKET_DIR"
	EnvImageDir      = "ZP_SHIM_IMAGE_DIR"
	DefaultSocketDir = "/run/zeroproxy/shim"
	// Images go to disk, not to a tmpfs under /run: freeing the memory is the point of scaling
	// a container to zero.
	DefaultImageDir = "/var/lib/zeroproxy/shim"
)

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// SocketDir is where the control sockets, one per container, are created.
func SocketDir() string { return envOr(EnvSocketDir, DefaultSocketDir) }

// ImageDir is the root of the per-container checkpoint directories.
func ImageDir() string { return envOr(EnvImageDir, DefaultImageDir) }

// SocketPath is the control socket of one container. Container ids are unique per containerd
// namespace only, but the agent works in one namespace (k8s.io), so the id alone names it; a
// clash with a live socket fails the container's creation rather than sharing a socket.
func SocketPath(id string) string { return filepath.Join(SocketDir(), id+".sock") }

// containerDir holds one container's checkpoint images and CRIU's logs.
func containerDir(namespace, id string) string { return filepath.Join(ImageDir(), namespace, id) }

// runcOptions turns whatever containerd passed as task options into runc's options, which the
// runc packages require (they type-assert without checking).
//
// Three shapes arrive: none; runc's own Options (a client that knows this shim wraps runc); and
// runtimeoptions.Options, which containerd 1.6's CRI sends for every runtime type it does not
// know — so on a Kubernetes node the runtime entry says `ConfigPath = "/etc/zeroproxy/shim.toml"`
// and that file holds runc option fields by their Go names (e.g. `CriuPath = "/opt/.../criu"`,
// which becomes runc's --criu: Debian's CRIU cannot dump on these kernels).
func runcOptions(any *ptypes.Any) (*options.Options, error) {
	if any == nil || any.GetTypeUrl() == "" {
		return &options.Options{}, nil
	}
	v, err := typeurl.UnmarshalAny(any)
	if err != nil {
		return nil, fmt.Errorf("task options of type %s: %v: %w", any.GetTypeUrl(), err, errdefs.ErrInvalidArgument)
	}
	switch o := v.(type) {
	case *options.Options:
		return o, nil
	case *runtimeoptions.Options:
		if o.ConfigPath == "" {
			return &options.Options{}, nil
		}
		return readOptionsFile(o.ConfigPath)
	default:
		return nil, fmt.Errorf("task options of type %T are neither runc's Options nor a ConfigPath: %w", v, errdefs.ErrInvalidArgument)
	}
}

// readOptionsFile reads runc options from a TOML file; unknown keys are an error so a typo is
// not silently ignored.
func readOptionsFile(path string) (*options.Options, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("shim options file (ConfigPath): %v: %w", err, errdefs.ErrInvalidArgument)
	}
	tree, err := toml.LoadBytes(data)
	if err != nil {
		return nil, fmt.Errorf("shim options file %s: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	known := map[string]bool{
		"NoPivotRoot": true, "NoNewKeyring": true, "ShimCgroup": true, "IoUid": true, "IoGid": true,
		"BinaryName": true, "Root": true, "CriuPath": true, "SystemdCgroup": true,
		"CriuImagePath": true, "CriuWorkPath": true,
	}
	for _, k := range tree.Keys() {
		if !known[k] {
			return nil, fmt.Errorf("shim options file %s: unknown key %q (runc option names, e.g. CriuPath): %w",
				path, k, errdefs.ErrInvalidArgument)
		}
	}
	var o options.Options
	if err := tree.Unmarshal(&o); err != nil {
		return nil, fmt.Errorf("shim options file %s: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	if o.CriuPath != "" {
		if st, err := os.Stat(o.CriuPath); err != nil || st.IsDir() {
			return nil, fmt.Errorf("shim options file %s: CriuPath %s is not a file: %w", path, o.CriuPath, errdefs.ErrInvalidArgument)
		}
	}
	return &o, nil
}

// marshalOptions is the reverse, so the runc packages (and options.json in the bundle, which the
// shim's delete action reads) always see runc's own type.
func marshalOptions(o *options.Options) (*ptypes.Any, error) {
	return typeurl.MarshalAny(o)
}
