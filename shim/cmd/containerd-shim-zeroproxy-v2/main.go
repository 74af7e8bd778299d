// Command containerd-shim-zeroproxy-v2 is containerd's runtime io.containerd.zeroproxy.v2: runc
// containers that zeroproxy can checkpoint to disk and restore in place while containerd and the
// kubelet keep seeing them Running. Everything lives in package task.
package main

import (
	"context"

	"github.com/containerd/containerd/runtime/v2/shim"

	"github.com/zeroproxy/zeroproxy/shim/task"
)

func main() {
	shim.RunManager(context.Background(), task.NewManager(task.RuntimeName))
}
