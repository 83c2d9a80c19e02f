package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/daemon"
	"github.com/childflow/childflow/internal/doctor"
	"github.com/childflow/childflow/policy"
)

// runDaemon is `childflow daemon`: the node engine for containers and pods.
func runDaemon(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg daemon.Config
	var dns []string
	var readyFD int
	var maxSize, retain string
	fs := pflag.NewFlagSet("daemon", pflag.ContinueOnError)
	fs.StringVar(&cfg.Socket, "socket", api.DefaultSocket, "unix socket of the API (root only)")
	fs.StringVar(&cfg.StateDir, "state-dir", api.DefaultStateDir, "where attachments are recorded for re-adoption")
	fs.StringVar(&cfg.FlowLogDir, "flow-log-dir", "/var/log/childflow", "one flow log per sandbox here; empty: none")
	fs.StringVar(&maxSize, "flow-log-max-size", "32MiB", "once a sandbox's flow log holds SIZE (KiB, MiB, GiB), it is rotated; 0: unbounded")
	fs.IntVar(&cfg.FlowLogKeep, "flow-log-max-files", 4, "flow log files kept per sandbox, rotated ones (ID.jsonl.1, ...) and the current")
	fs.StringVar(&retain, "flow-log-retain", "1GiB", "the flow logs of sandboxes no longer attached are removed, oldest first, beyond SIZE together; 0: all kept")
	fs.BoolVar(&cfg.FlowLogStdout, "flow-log-stdout", false, "also write every sandbox's flow log events to stdout (with pod namespace/name/uid)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9187); empty: off")
	fs.StringSliceVarP(&dns, "dns", "d", nil, "resolvers for sandboxes whose policy names none; default: the host's")
	fs.IntVar(&cfg.MaxFlows, "max-flows", 0, "open flows of all sandboxes together, which share the node's ephemeral ports; 0: half of net.ipv4.ip_local_port_range")
	fs.BoolVar(&cfg.ExitWhenIdle, "exit-when-idle", false, "exit once no sandbox is attached (per-container engine)")
	fs.IntVar(&readyFD, "ready-fd", -1, "write a byte to this fd and close it once the socket is up")
	if code, done := parseSubcommand(fs, args, 0, stdout, stderr); done {
		return code
	}
	var err error
	if cfg.FlowLogMaxSize, err = parseSize("--flow-log-max-size", maxSize); err != nil {
		return usageError(stderr, err)
	}
	if cfg.FlowLogRetain, err = parseSize("--flow-log-retain", retain); err != nil {
		return usageError(stderr, err)
	}
	if cfg.MaxFlows < 0 {
		return usageError(stderr, policy.Usagef("invalid --max-flows %d: at least 1, or 0 for the default", cfg.MaxFlows))
	}
	if cfg.FlowLogKeep < 1 {
		return usageError(stderr, policy.Usagef("invalid --flow-log-max-files %d: at least 1", cfg.FlowLogKeep))
	}
	if cfg.DNS, err = policy.ParseResolvers("--dns", dns); err != nil {
		return usageError(stderr, err)
	}
	if len(cfg.DNS) == 0 {
		hostResolv, _ := os.ReadFile("/etc/resolv.conf")
		cfg.DNS, _ = policy.ParseResolvers("nameserver", doctor.ParseNameservers(string(hostResolv)))
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "childflow: daemon: needs root (it enters other network namespaces)")
		return exitFailure
	}
	cfg.Stdout = stdout
	logger := log.New(stderr, "childflow daemon: ", log.LstdFlags)
	cfg.Logf = logger.Printf
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	ready := func() {
		if readyFD >= 0 {
			f := os.NewFile(uintptr(readyFD), "ready")
			f.Write([]byte{1})
			f.Close()
		}
	}
	if err := daemon.Run(ctx, cfg, ready); err != nil {
		fmt.Fprintf(stderr, "childflow: daemon: %v\n", err)
		return exitFailure
	}
	return 0
}

// parseSize reads a size in bytes with an optional binary unit: 4096,
// 64KiB, 32MiB, 1GiB (K, M, G, Ki, Mi and Gi too).
func parseSize(flag, v string) (int64, error) {
	num := strings.TrimRight(v, "KMGiB")
	unit := int64(1)
	switch strings.TrimSuffix(strings.TrimSuffix(v[len(num):], "B"), "i") {
	case "":
	case "K":
		unit = 1 << 10
	case "M":
		unit = 1 << 20
	case "G":
		unit = 1 << 30
	default:
		num = ""
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/unit {
		return 0, policy.Usagef("invalid %s %q: want a size such as 32MiB", flag, v)
	}
	return n * unit, nil
}

// runSandboxes is `childflow sandboxes`: what the node daemon relays.
func runSandboxes(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("sandboxes", pflag.ContinueOnError)
	socket := fs.String("socket", api.DefaultSocket, "the daemon's socket")
	format := fs.String("format", "text", "text|json")
	if code, done := parseSubcommand(fs, args, 0, stdout, stderr); done {
		return code
	}
	if err := checkChoice("--format", *format, "text", "json"); err != nil {
		return usageError(stderr, err)
	}
	list, err := api.Client{Socket: *socket}.List()
	if err != nil {
		fmt.Fprintf(stderr, "childflow: sandboxes: %v\n", err)
		return exitFailure
	}
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(list)
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSOURCE\tPID\tFLOWS\tDENIED\tUP\tDOWN\tSINCE")
	for _, s := range list {
		source := s.Source
		if s.Lingering {
			source += " (lingering)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n", s.ID, source, s.PID, s.Flows, s.Denied, s.BytesUp, s.BytesDown, s.Since.Format("2006-01-02T15:04:05"))
	}
	tw.Flush()
	return 0
}
