package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/pflag"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/daemon"
)

// runCleanup is `childflow cleanup`: forget what a crashed daemon left
// behind. Sandboxes whose namespace still lives are kept (and reported):
// removing their TUN or steering would leave them with no network or,
// worse, an open one; the next daemon re-adopts them.
func runCleanup(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("cleanup", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	stateDir := fs.String("state-dir", api.DefaultStateDir, "the daemon's state directory")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return usageError(stderr, err)
	}
	r, err := daemon.Cleanup(*stateDir)
	if err != nil {
		fmt.Fprintf(stderr, "childflow: cleanup: %v\n", err)
		return exitFailure
	}
	for _, id := range r.Removed {
		fmt.Fprintf(stdout, "removed the record of sandbox %s (its network namespace is gone)\n", id)
	}
	for _, id := range r.Live {
		fmt.Fprintf(stdout, "kept sandbox %s: its network namespace lives; the next daemon re-adopts it\n", id)
	}
	if r.Tombstones > 0 {
		fmt.Fprintf(stdout, "cleared %d pending detach(es)\n", r.Tombstones)
	}
	return 0
}
