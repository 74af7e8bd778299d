// Command crictl is zeroproxy's stand-in for cri-tools' crictl, which Debian does not package.
//
// kubeadm 1.20 refuses to run without a `crictl` on PATH and drives the container runtime through
// it (cmd/kubeadm/app/util/runtime/runtime.go). This program answers exactly the calls kubeadm
// makes, with the output kubeadm parses, and nothing else:
//
//	crictl -r ENDPOINT info              exit status says whether the runtime answers
//	crictl -r ENDPOINT pods -q           one pod sandbox ID per line (all states)
//	crictl -r ENDPOINT stopp ID...       stop pod sandboxes
//	crictl -r ENDPOINT rmp ID...         remove pod sandboxes
//	crictl -r ENDPOINT inspecti IMAGE    exit status says whether the image is present
//	crictl -r ENDPOINT pull IMAGE        pull an image
//
// It speaks CRI v1alpha2 (what the 1.20 kubelet speaks) over gRPC with the tree's vendored
// client stubs; scripts/build-k8s.sh copies it into the Kubernetes tree to build it there, so
// every import resolves from vendor/ and the version stamp is the tree's own.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"k8s.io/component-base/version"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1alpha2"
	criutil "k8s.io/kubernetes/pkg/kubelet/cri/remote/util"
)

// The default endpoint is containerd's, like crictl's first guess; kubeadm always passes -r.
const defaultEndpoint = "unix:///run/containerd/containerd.sock"

type options struct {
	runtimeEndpoint string
	imageEndpoint   string
	timeout         time.Duration
}

// connect opens a gRPC connection to a CRI endpoint. The dial is not blocking: with no runtime
// listening, the first call fails at once with the dial error (no such file, connection refused),
// which says more than a timeout would.
func connect(endpoint string) (*grpc.ClientConn, error) {
	// A bare socket path means unix://; said here, the library would warn about it on stderr,
	// which a caller reading the combined output (kubeadm does) would take for output.
	if strings.HasPrefix(endpoint, "/") {
		endpoint = "unix://" + endpoint
	}
	addr, dialer, err := criutil.GetAddressAndDialer(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	conn, err := grpc.Dial(addr, grpc.WithInsecure(), grpc.WithContextDialer(dialer))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", endpoint, err)
	}
	return conn, nil
}

func (o *options) runtime() (runtimeapi.RuntimeServiceClient, error) {
	conn, err := connect(o.runtimeEndpoint)
	if err != nil {
		return nil, err
	}
	return runtimeapi.NewRuntimeServiceClient(conn), nil
}

func (o *options) images() (runtimeapi.ImageServiceClient, error) {
	endpoint := o.imageEndpoint
	if endpoint == "" {
		endpoint = o.runtimeEndpoint
	}
	conn, err := connect(endpoint)
	if err != nil {
		return nil, err
	}
	return runtimeapi.NewImageServiceClient(conn), nil
}

func (o *options) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), o.timeout)
}

// printJSON writes v indented. Verbose CRI answers carry JSON documents as strings in their
// info maps; those are embedded as JSON rather than as quoted strings, so the output is one
// readable document.
func printJSON(v interface{}, info map[string]string) error {
	doc := map[string]interface{}{"status": v}
	if len(info) > 0 {
		decoded := map[string]interface{}{}
		for k, s := range info {
			var raw json.RawMessage
			if json.Unmarshal([]byte(s), &raw) == nil {
				decoded[k] = raw
			} else {
				decoded[k] = s
			}
		}
		doc["info"] = decoded
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(out))
	return err
}

func infoCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "info",
		Short: "Show the runtime's status; exits non-zero if the runtime does not answer",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			client, err := o.runtime()
			if err != nil {
				return err
			}
			ctx, cancel := o.ctx()
			defer cancel()
			resp, err := client.Status(ctx, &runtimeapi.StatusRequest{Verbose: true})
			if err != nil {
				return fmt.Errorf("runtime status from %s: %w", o.runtimeEndpoint, err)
			}
			return printJSON(resp.Status, resp.Info)
		},
	}
}

func podsCmd(o *options) *cobra.Command {
	var quiet bool
	cmd := &cobra.Command{
		Use:   "pods",
		Short: "List pod sandboxes in every state",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			client, err := o.runtime()
			if err != nil {
				return err
			}
			ctx, cancel := o.ctx()
			defer cancel()
			resp, err := client.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
			if err != nil {
				return fmt.Errorf("list pod sandboxes from %s: %w", o.runtimeEndpoint, err)
			}
			pods := resp.Items
			// Newest first, as crictl lists them.
			sort.SliceStable(pods, func(i, j int) bool { return pods[i].CreatedAt > pods[j].CreatedAt })
			if quiet {
				for _, p := range pods {
					fmt.Println(p.Id)
				}
				return nil
			}
			w := tabwriter.NewWriter(os.Stdout, 0, 8, 3, ' ', 0)
			fmt.Fprintln(w, "POD ID\tCREATED\tSTATE\tNAME\tNAMESPACE\tATTEMPT")
			for _, p := range pods {
				var name, namespace string
				var attempt uint32
				if p.Metadata != nil {
					name, namespace, attempt = p.Metadata.Name, p.Metadata.Namespace, p.Metadata.Attempt
				}
				created := time.Unix(0, p.CreatedAt).UTC().Format(time.RFC3339)
				state := strings.TrimPrefix(p.State.String(), "SANDBOX_")
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\n", p.Id, created, state, name, namespace, attempt)
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only pod sandbox IDs, one a line")
	return cmd
}

// sandboxCmd makes stopp and rmp: one call per ID, stopping at the first failure (kubeadm
// passes one ID at a time and reads the output of a failure).
func sandboxCmd(o *options, use, short, done string,
	call func(context.Context, runtimeapi.RuntimeServiceClient, string) error) *cobra.Command {
	return &cobra.Command{
		Use:   use + " POD-ID...",
		Short: short,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, ids []string) error {
			client, err := o.runtime()
			if err != nil {
				return err
			}
			for _, id := range ids {
				ctx, cancel := o.ctx()
				err := call(ctx, client, id)
				cancel()
				if err != nil {
					return fmt.Errorf("%s pod sandbox %q: %w", use, id, err)
				}
				fmt.Printf("%s sandbox %s\n", done, id)
			}
			return nil
		},
	}
}

func stopCmd(o *options) *cobra.Command {
	return sandboxCmd(o, "stopp", "Stop pod sandboxes", "Stopped",
		func(ctx context.Context, c runtimeapi.RuntimeServiceClient, id string) error {
			_, err := c.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id})
			return err
		})
}

func removeCmd(o *options) *cobra.Command {
	return sandboxCmd(o, "rmp", "Remove pod sandboxes", "Removed",
		func(ctx context.Context, c runtimeapi.RuntimeServiceClient, id string) error {
			_, err := c.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id})
			return err
		})
}

func inspectImageCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "inspecti IMAGE...",
		Short: "Show images' status; exits non-zero if one is not present",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, refs []string) error {
			client, err := o.images()
			if err != nil {
				return err
			}
			for _, ref := range refs {
				ctx, cancel := o.ctx()
				resp, err := client.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{
					Image: &runtimeapi.ImageSpec{Image: ref}, Verbose: true})
				cancel()
				if err != nil {
					return fmt.Errorf("image status of %q: %w", ref, err)
				}
				// A runtime answers a missing image with an empty status, not an error.
				if resp.Image == nil {
					return fmt.Errorf("no such image %q present", ref)
				}
				if err := printJSON(resp.Image, resp.Info); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

func pullCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "pull IMAGE",
		Short: "Pull an image",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			client, err := o.images()
			if err != nil {
				return err
			}
			// A pull takes as long as the registry needs: no deadline, as crictl has none.
			resp, err := client.PullImage(context.Background(), &runtimeapi.PullImageRequest{
				Image: &runtimeapi.ImageSpec{Image: args[0]}})
			if err != nil {
				return fmt.Errorf("pull image %q: %w", args[0], err)
			}
			if resp.ImageRef == "" {
				return fmt.Errorf("pull image %q: the runtime returned no image reference", args[0])
			}
			fmt.Printf("Image is up to date for %s\n", resp.ImageRef)
			return nil
		},
	}
}

func versionCmd(o *options) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Show the runtime's name and version",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			client, err := o.runtime()
			if err != nil {
				return err
			}
			ctx, cancel := o.ctx()
			defer cancel()
			resp, err := client.Version(ctx, &runtimeapi.VersionRequest{})
			if err != nil {
				return fmt.Errorf("runtime version from %s: %w", o.runtimeEndpoint, err)
			}
			fmt.Printf("Version:  %s\nRuntimeName:  %s\nRuntimeVersion:  %s\nRuntimeApiVersion:  %s\n",
				resp.Version, resp.RuntimeName, resp.RuntimeVersion, resp.RuntimeApiVersion)
			return nil
		},
	}
}

func newRoot() *cobra.Command {
	o := &options{}
	root := &cobra.Command{
		Use:   "crictl",
		Short: "zeroproxy's stand-in for crictl: the CRI calls kubeadm " + version.Get().GitVersion + " makes",
		// Stamped with the tree's version, like every other binary built from it.
		Version:       version.Get().GitVersion,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetVersionTemplate("crictl version {{.Version}} (zeroproxy stand-in)\n")
	endpoint := os.Getenv("CONTAINER_RUNTIME_ENDPOINT")
	if endpoint == "" {
		endpoint = defaultEndpoint
	}
	flags := root.PersistentFlags()
	flags.StringVarP(&o.runtimeEndpoint, "runtime-endpoint", "r", endpoint,
		"CRI runtime endpoint, e.g. unix:///run/containerd/containerd.sock (env CONTAINER_RUNTIME_ENDPOINT)")
	flags.StringVarP(&o.imageEndpoint, "image-endpoint", "i", os.Getenv("IMAGE_SERVICE_ENDPOINT"),
		"CRI image endpoint; the runtime endpoint when empty (env IMAGE_SERVICE_ENDPOINT)")
	flags.DurationVarP(&o.timeout, "timeout", "t", 10*time.Second, "deadline of each call but pull")
	root.AddCommand(infoCmd(o), podsCmd(o), stopCmd(o), removeCmd(o), inspectImageCmd(o), pullCmd(o),
		versionCmd(o))
	return root
}

func main() {
	root := newRoot()
	// Cobra checks flags and arguments before it runs the persistent pre-run hook: an error with
	// the hook not reached is a wrong call, and gets a pointer to the usage.
	reached := false
	root.PersistentPreRun = func(*cobra.Command, []string) { reached = true }
	if err := root.Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "crictl: %s\n", err)
		if !reached {
			fmt.Fprintln(os.Stderr, "Run 'crictl --help' for usage.")
		}
		os.Exit(1)
	}
}
