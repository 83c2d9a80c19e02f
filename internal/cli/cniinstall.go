package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/pflag"

	"github.com/childflow/childflow/cni"
	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/policy"
)

// runCNIInstall is `childflow cni-install`: the DaemonSet's init
// container puts childflow-cni into the node's CNI chain.
func runCNIInstall(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("cni-install", pflag.ContinueOnError)
	self, _ := os.Executable()
	source := fs.String("source", filepath.Join(filepath.Dir(self), "childflow-cni"), "the plugin binary to install")
	binDir := fs.String("bin-dir", "/opt/cni/bin", "the node's CNI binary directory")
	confDir := fs.String("conf-dir", "/etc/cni/net.d", "the node's CNI configuration directory")
	cidrs := fs.StringSlice("cluster-cidrs", nil, "pod and service ranges, node addresses: they stay on the pod's main interface")
	all := fs.Bool("all-through-engine", false, "send cluster traffic through the engine too")
	socket := fs.String("socket", api.DefaultSocket, "the daemon's socket, as seen by the plugin on the node")
	uninstall := fs.Bool("uninstall", false, "remove the plugin from every conflist and its binary")
	if code, done := parseSubcommand(fs, args, 0, stdout, stderr); done {
		return code
	}
	if *uninstall {
		if err := cni.Uninstall(*binDir, *confDir); err != nil {
			fmt.Fprintf(stderr, "childflow: cni-install --uninstall: %v\n", err)
			return exitFailure
		}
		fmt.Fprintf(stdout, "removed %s from %s and %s\n", cni.PluginType, *confDir, *binDir)
		return 0
	}
	if _, err := policy.ParseCIDRs("--cluster-cidrs", *cidrs); err != nil {
		return usageError(stderr, err)
	}
	entry := map[string]any{"socket": *socket, "allThroughEngine": *all}
	if len(*cidrs) > 0 {
		entry["clusterCIDRs"] = *cidrs
	}
	path, err := cni.Install(*source, *binDir, *confDir, entry)
	if err != nil {
		fmt.Fprintf(stderr, "childflow: cni-install: %v\n", err)
		return exitFailure
	}
	fmt.Fprintf(stdout, "chained %s into %s\n", cni.PluginType, path)
	return 0
}
