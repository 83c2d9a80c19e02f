package cli

import (
	"fmt"
	"io"

	"github.com/spf13/pflag"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/daemon"
	"github.com/childflow/childflow/internal/rootful"
)

// runCleanup is `childflow cleanup`: remove what killed `--root` runs
// left on the host, and forget what a crashed daemon left behind. Sandboxes whose namespace still lives are kept (and reported):
// removing their TUN or steering would leave them with no network or,
// worse, an open one; the next daemon re-adopts them.
func runCleanup(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("cleanup", pflag.ContinueOnError)
	stateDir := fs.String("state-dir", api.DefaultStateDir, "the daemon's state directory")
	rootDir := fs.String("root-state-dir", rootful.DefaultStateDir, "the rootful sandboxes' state directory")
	if code, done := parseSubcommand(fs, args, 0, stdout, stderr); done {
		return code
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
	rr, err := rootful.Cleanup(*rootDir)
	for _, id := range rr.Removed {
		fmt.Fprintf(stdout, "removed rootful sandbox %s (its childflow process is gone)\n", id)
	}
	for _, o := range rr.Orphans {
		fmt.Fprintf(stdout, "removed %s (no record named it)\n", o)
	}
	for _, id := range rr.Live {
		fmt.Fprintf(stdout, "kept rootful sandbox %s: its childflow process runs\n", id)
	}
	if err != nil {
		fmt.Fprintf(stderr, "childflow: cleanup: %v\n", err)
		return exitFailure
	}
	return 0
}
