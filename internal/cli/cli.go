// Package cli is the childflow command line: exec (the default),
// daemon, sandboxes, cleanup, cni-install, doctor and version.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine"
	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/proxy"
	"github.com/childflow/childflow/internal/asuser"
	"github.com/childflow/childflow/internal/doctor"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/report"
	"github.com/childflow/childflow/internal/rootful"
	"github.com/childflow/childflow/internal/sandbox"
	"github.com/childflow/childflow/internal/version"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// Exit codes besides the command's own.
const (
	exitFailure = 1 // childflow could not set up the sandbox
	exitUsage   = 2 // bad flags or values
	exitLeak    = 3 // --fail-on-leak: something was blocked
)

// Run is the whole CLI; it returns the process exit code.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 1 {
		switch args[1] {
		case "exec":
			return runExec(ctx, args[2:], stdout, stderr)
		case "doctor":
			return runDoctor(args[2:], stdout, stderr)
		case "report":
			return runReport(args[2:], stdout, stderr)
		case "daemon":
			return runDaemon(ctx, args[2:], stdout, stderr)
		case "cleanup":
			return runCleanup(args[2:], stdout, stderr)
		case "cni-install":
			return runCNIInstall(args[2:], stdout, stderr)
		case "sandboxes":
			return runSandboxes(args[2:], stdout, stderr)
		case "help":
			return runHelp(args[2:], stdout, stderr)
		case "version", "--version":
			if len(args) > 2 {
				return usageError(stderr, policy.Usagef("childflow version takes no arguments, got %q", args[2:]))
			}
			fmt.Fprintf(stdout, "childflow %s\n", version.Version)
			return 0
		}
	}
	return runExec(ctx, args[1:], stdout, stderr)
}

// execUsage is childflow's own help: how to run a command, the other
// commands, the options and the exit status.
func execUsage(fs *pflag.FlagSet, stdout io.Writer) {
	fmt.Fprintf(stdout, `Usage: childflow [exec] [OPTIONS] [--] COMMAND [ARG...]
       childflow COMMAND [OPTIONS] [ARG...]

Runs COMMAND in its own network namespace, whose only way out is through
childflow: it decides what may leave, answers the sandbox's DNS, forces a
proxy if asked, and records it all.

Commands:
`)
	for _, c := range commands {
		fmt.Fprintf(stdout, "  %-12s %s\n", c.name, c.about)
	}
	fmt.Fprintf(stdout, `
Options:
%s
Exit status: COMMAND's (128+N when signal N killed it); 1 when childflow
could not set the sandbox up, 2 for a usage error, 3 with --fail-on-leak
when COMMAND exited 0 but a flow was blocked.
`, fs.FlagUsages())
}

func usageError(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "childflow: %v\n", err)
	return exitUsage
}

// outputError reports an output file that could not be created: a path
// that names no regular file is the caller's mistake (exit 2).
func outputError(stderr io.Writer, flag string, err error) int {
	fmt.Fprintf(stderr, "childflow: %s: %v\n", flag, err)
	if errors.Is(err, flowlog.ErrNotAFile) {
		return exitUsage
	}
	return exitFailure
}

// command is one of childflow's subcommands, as its help lists it.
type command struct{ name, args, about string }

var commands = []command{
	{"exec", "[OPTIONS] [--] COMMAND [ARG...]", "run COMMAND in a network sandbox (the default: \"exec\" may be left out)"},
	{"doctor", "[--format text|json]", "check this host's requirements"},
	{"report", "[--format text|markdown|json|html] FLOWLOG", "render a saved flow log"},
	{"cleanup", "[OPTIONS]", "remove what crashed runs and daemons left on the host"},
	{"daemon", "[OPTIONS]", "run the node engine that containers and pods attach to"},
	{"sandboxes", "[--format text|json]", "list the daemon's sandboxes"},
	{"cni-install", "[OPTIONS]", "install (or --uninstall) the CNI plugin on this node"},
	{"version", "", "print childflow's version"},
	{"help", "[COMMAND]", "print this help, or a command's"},
}

// setUsage makes --help print the command's synopsis and options on
// stdout: help asked for is output, not an error.
func setUsage(fs *pflag.FlagSet, stdout io.Writer) {
	fs.Usage = func() {
		if c, ok := commandNamed(fs.Name()); ok {
			c.synopsis(stdout)
		}
		fmt.Fprintf(stdout, "\nOptions:\n%s", fs.FlagUsages())
	}
}

func commandNamed(name string) (command, bool) {
	i := slices.IndexFunc(commands, func(c command) bool { return c.name == name })
	if i < 0 {
		return command{}, false
	}
	return commands[i], true
}

// synopsis prints how to call the command and what it does.
func (c command) synopsis(w io.Writer) {
	fmt.Fprintf(w, "Usage: %s\n\n%s%s.\n", strings.TrimSpace("childflow "+c.name+" "+c.args), strings.ToUpper(c.about[:1]), c.about[1:])
}

// runHelp is `childflow help [COMMAND]`.
func runHelp(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return Run(context.Background(), []string{"childflow", "--help"}, stdout, stderr)
	}
	c, ok := commandNamed(args[0])
	switch {
	case !ok || len(args) > 1:
		return usageError(stderr, policy.Usagef("childflow help takes one of childflow's commands, got %q", args))
	case c.name == "help" || c.name == "version": // no options
		c.synopsis(stdout)
		return 0
	}
	return Run(context.Background(), []string{"childflow", c.name, "--help"}, stdout, stderr)
}

// parseSubcommand parses a subcommand's flags and wants exactly nargs
// arguments besides them: an extra word is more likely a typo or a
// misplaced command than something to ignore. done says to return code
// at once (0 for --help).
func parseSubcommand(fs *pflag.FlagSet, args []string, nargs int, stdout, stderr io.Writer) (code int, done bool) {
	fs.SetOutput(stderr)
	setUsage(fs, stdout)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0, true
		}
		return usageError(stderr, err), true
	}
	switch {
	case fs.NArg() == nargs:
		return 0, false
	case nargs == 0:
		return usageError(stderr, policy.Usagef("childflow %s takes no arguments, got %q", fs.Name(), fs.Args())), true
	default:
		return usageError(stderr, policy.Usagef("childflow %s takes %d argument(s), got %q", fs.Name(), nargs, fs.Args())), true
	}
}

func runDoctor(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("doctor", pflag.ContinueOnError)
	format := fs.String("doctor-format", "text", "text|json")
	fs.StringVar(format, "format", "text", "text|json")
	if code, done := parseSubcommand(fs, args, 0, stdout, stderr); done {
		return code
	}
	return doctorReport(given(fs, "doctor-format", "format"), *format, stdout, stderr)
}

// given is the flag of a value two flags set, as the user wrote it: the
// second if given, else the first.
func given(fs *pflag.FlagSet, flag, alias string) string {
	if fs.Changed(alias) {
		return "--" + alias
	}
	return "--" + flag
}

// runReport is `childflow report FILE`, the same as `--report FILE`.
func runReport(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("report", pflag.ContinueOnError)
	format := fs.String("report-format", "text", "report format: "+strings.Join(report.Formats, "|"))
	fs.StringVar(format, "format", "text", "the same as --report-format")
	if code, done := parseSubcommand(fs, args, 1, stdout, stderr); done {
		return code
	}
	caller, err := asuser.FromSudo()
	if err != nil {
		return usageError(stderr, err)
	}
	return renderReport(caller, "report", fs.Arg(0), given(fs, "report-format", "format"), *format, stdout, stderr)
}

func doctorReport(formatFlag, format string, stdout, stderr io.Writer) int {
	if err := checkChoice(formatFlag, format, "text", "json"); err != nil {
		return usageError(stderr, err)
	}
	r := doctor.Local().Run()
	if format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(r)
	} else {
		fmt.Fprint(stdout, r.Text())
	}
	if r.Overall == "blocked" {
		return exitFailure
	}
	return 0
}

func runExec(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var o execOptions
	fs := newExecFlags(&o)
	fs.SetOutput(stderr)
	fs.Usage = func() { execUsage(fs, stdout) }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return usageError(stderr, err)
	}
	if o.doctor {
		return doctorReport("--doctor-format", o.doctorFormat, stdout, stderr)
	}
	// The files the user names are opened with their rights, under sudo.
	caller, err := asuser.FromSudo()
	if err != nil {
		return usageError(stderr, err)
	}
	if o.report != "" {
		return renderReport(caller, "--report", o.report, "--report-format", o.reportFormat, stdout, stderr)
	}
	command := fs.Args()
	if o.profile != "" {
		prof, err := asuser.Call(caller, func() (*profile.Profile, error) { return profile.Load(o.profile) })
		if err != nil {
			return usageError(stderr, err)
		}
		profCommand, err := o.applyProfile(prof)
		if err != nil {
			return usageError(stderr, err)
		}
		if len(command) == 0 {
			command = profCommand
		}
	}
	if o.dumpProfile {
		out, err := o.effective(command).TOML()
		if err != nil {
			fmt.Fprintf(stderr, "childflow: --dump-profile: %v\n", err)
			return exitFailure
		}
		fmt.Fprint(stdout, out)
		return 0
	}
	if len(command) == 0 {
		return usageError(stderr, errors.New("no command given: childflow [exec] [OPTIONS] [--] COMMAND..."))
	}
	settings, err := api.Resolve(o.effective(nil), o.keyName)
	if err != nil {
		return usageError(stderr, err)
	}
	pol, upstreams := settings.Policy, settings.DNS
	fwd := proxy.FromURI(settings.Proxy, settings.ProxyInsecure)
	hostResolv, _ := os.ReadFile("/etc/resolv.conf")
	if len(upstreams) == 0 {
		upstreams, _ = policy.ParseResolvers("nameserver", doctor.ParseNameservers(string(hostResolv)))
	}
	// The names the sandbox will read from its hosts file count as
	// answers of the engine's, for the domain rules and the flows'
	// records; nothing else reads them (a blocklist installed as
	// /etc/hosts costs milliseconds).
	needNames := pol.HasDomainRules() || o.flowLog != "" || o.summary
	var hosts map[netip.Addr][]string
	if o.hostsFile != "" {
		hosts, err = asuser.Call(caller, func() (map[netip.Addr][]string, error) {
			f, err := openRegular(o.hostsFile)
			if err != nil {
				return nil, err
			}
			defer f.Close()
			if !needNames {
				return nil, nil
			}
			return dns.ParseHosts(f), nil
		})
		if err != nil {
			return usageError(stderr, policy.Usagef("invalid %s %q: %v", o.name("hosts-file"), o.hostsFile, err))
		}
		if o.hostsFile, err = filepath.Abs(o.hostsFile); err != nil {
			return usageError(stderr, policy.Usagef("invalid %s %q: %v", o.name("hosts-file"), o.hostsFile, err))
		}
	} else if needNames {
		if f, err := os.Open("/etc/hosts"); err == nil {
			hosts = dns.ParseHosts(f)
			f.Close()
		}
	}

	if o.mtu < 1280 || o.mtu > 65520 {
		return usageError(stderr, policy.Usagef("invalid --mtu %d: must be between 1280 and 65520", o.mtu))
	}
	if err := checkChoice(o.name("summary-format"), o.summaryFormat, "text", "json"); err != nil {
		return usageError(stderr, err)
	}
	if err := checkChoice(o.name("capture-point"), o.capturePoint, "child", "egress", "wire-egress", "both"); err != nil {
		return usageError(stderr, err)
	}
	withheld, err := sandbox.WithholdInheritedFDs()
	if err != nil {
		var u *policy.UsageError
		if errors.As(err, &u) {
			return usageError(stderr, err)
		}
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	for _, note := range withheld {
		fmt.Fprintf(stderr, "childflow: %s\n", note)
	}
	// Root without CAP_SYS_ADMIN and CAP_NET_ADMIN (the command of
	// another childflow, a restricted container) builds its sandbox as
	// any user does, in a user namespace.
	host := doctor.Local()
	privileged := host.Privileged()
	if o.root {
		if !privileged {
			return usageError(stderr, policy.Usagef("%s needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN: run childflow --root through sudo (the command still runs as you)", o.name("root")))
		}
		if o.capture != "" && o.capturePoint != "child" {
			return usageError(stderr, policy.Usagef("invalid %s %q with %s: only child is supported (the host end of the sandbox's veth)", o.name("capture-point"), o.capturePoint, o.name("root")))
		}
	} else if o.iface != "" {
		return usageError(stderr, policy.Usagef("invalid %s %q: needs --root", o.name("iface"), o.iface))
	}
	rootless := !privileged
	if err := host.Preflight(o.root); err != nil {
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	// Done while init starts.
	registered := sandbox.RegisterForwardedSignals()
	// Init starts up while the rest is worked out; it builds nothing
	// until Build, and is gone again if childflow stops before that.
	sb, err := sandbox.Start(command, rootless)
	if err != nil {
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	built := false
	defer func() {
		if !built {
			sb.Kill()
			sb.Wait()
		}
	}()
	// Every output path is looked at before any file is created: a
	// mistake in one leaves the others as they were.
	for _, out := range []struct {
		flag  string
		paths []string
	}{{o.name("capture"), capturePaths(o.capture, o.capturePoint)}, {o.name("flow-log"), []string{o.flowLog}}} {
		for _, p := range out.paths {
			if p == "" {
				continue
			}
			if err := flowlog.CheckPath(p); err != nil {
				return outputError(stderr, out.flag, err)
			}
		}
	}
	var plan netplan.Plan
	var rootNet *rootful.Sandbox
	if o.root {
		mtu := 1500 // the uplink's: the kernel forwards, nothing reassembles
		if o.set("mtu") {
			mtu = o.mtu
		}
		rootNet, err = rootful.Reserve(rootful.Config{MTU: mtu, Policy: pol, DNS: upstreams, Hosts: hosts, Proxy: fwd, Iface: o.iface, IfaceName: o.name("iface"),
			Warn: func(msg string) { fmt.Fprintf(stderr, "childflow: --root: %s\n", msg) }, CountViolations: o.failOnLeak})
		if err != nil {
			var u *policy.UsageError
			if errors.As(err, &u) {
				return usageError(stderr, err)
			}
			fmt.Fprintf(stderr, "childflow: --root: %v\n", err)
			return exitFailure
		}
		defer rootNet.Close()
		plan = rootNet.Plan
	} else {
		if plan, err = netplan.Choose(netplan.Routes(), o.mtu); err != nil {
			fmt.Fprintf(stderr, "childflow: %v\n", err)
			return exitFailure
		}
	}
	captures, err := openCaptures(caller, o.name, o.capture, o.capturePoint, o.root, privileged)
	if err != nil {
		var u *policy.UsageError
		if errors.As(err, &u) {
			return usageError(stderr, err)
		}
		return outputError(stderr, o.name("capture"), err)
	}
	defer captures.close(stderr)
	var sinks []func(flowlog.Event)
	if o.flowLog != "" {
		w, err := asuser.Call(caller, func() (*flowlog.Writer, error) { return flowlog.Create(o.flowLog) })
		if err != nil {
			return outputError(stderr, o.name("flow-log"), err)
		}
		defer closeReporting(w, o.name("flow-log"), "events", stderr)
		sinks = append(sinks, w.Log)
	}
	var summary *report.Report
	if o.summary {
		summary = report.New()
		sinks = append(sinks, summary.Add)
	}
	// No hook at all when nothing records events: the engine then skips
	// the work that only feeds them (such as finding a flow's process).
	var events func(flowlog.Event)
	switch len(sinks) {
	case 0:
	case 1:
		events = sinks[0]
	default:
		events = func(ev flowlog.Event) {
			for _, s := range sinks {
				s(ev)
			}
		}
	}

	if err := sb.Build(sandbox.Spec{
		Plan:       plan,
		ResolvConf: resolvConf(plan, hostResolv),
		HostsFile:  o.hostsFile,
		Hidden:     hidden(append([]string{o.flowLog}, captures.paths...)),
		RunAs:      caller.IDs(),
		Foreground: sandbox.InForeground(),
		Veth:       o.root,
	}); err != nil {
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	built = true
	// The engine gets ready while init builds the namespaces.
	var eng *engine.Engine
	if !o.root {
		// One sandbox's relay is a chain of hand-offs (TUN reader, TCP
		// processor, handler, host socket) in which each goroutine wakes
		// the next: on one processor the next runs on the same thread at
		// once, on several it often waits for an idle thread to wake and
		// steal it. Measured (docs/benchmarks.md): faster both in
		// connections per second and in throughput. GOMAXPROCS, when
		// set, still decides.
		if os.Getenv("GOMAXPROCS") == "" {
			runtime.GOMAXPROCS(1)
		}
		eng, err = engine.New(engine.Config{ID: "exec", Plan: plan, Policy: pol, CallerOwnsHost: true, DNS: upstreams, Hosts: hosts, Proxy: fwd, OnEvent: events, Capture: captures.child, OnUpstream: captures.upstream, SandboxPID: sb.Pid()})
		if err == nil {
			err = eng.Start(ctx)
			defer eng.Close()
		}
		if err != nil {
			sb.Kill()
			sb.Wait()
			fmt.Fprintf(stderr, "childflow: starting engine: %v\n", err)
			return exitFailure
		}
	}
	if err := sb.Ready(); err != nil {
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	var violations func() uint64
	var stop func(linger bool)
	if o.root {
		err = rootNet.Attach(sb.Pid(), events)
		if err == nil {
			err = captures.startLink(rootNet.HostIf)
		}
		if err != nil {
			err = fmt.Errorf("--root: %w", err)
		}
		violations, stop = rootNet.Violations, func(bool) {
			sb.Wait() // the sandbox is gone before its veth and tables
			if err := rootNet.Close(); err != nil {
				fmt.Fprintf(stderr, "childflow: --root: removing the sandbox's objects: %v (the next --root run or `childflow cleanup` removes what is left)\n", err)
			}
		}
	} else {
		if err = eng.Attach(sb.TUN, sb.SocketDiag); err != nil {
			err = fmt.Errorf("starting engine: %w", err)
		}
		violations, stop = eng.Violations, func(linger bool) {
			if linger {
				eng.Linger(engine.LingerMax)
			}
			eng.Close()
		}
	}
	if err != nil {
		sb.Kill()
		sb.Wait()
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}

	sigs := <-registered
	go func() {
		for s := range sigs {
			sb.Signal(s)
		}
	}()
	if err := sb.Run(); err != nil {
		sb.Kill()
		sb.Wait()
		fmt.Fprintf(stderr, "childflow: %v\n", err)
		return exitFailure
	}
	defer sb.Wait()
	code := sb.Exited()
	if sb.CommandHasTerminal() {
		reclaimTerminal()
	}
	// A command killed by a signal (^C) is not waited for.
	stop(code < 128)
	captures.close(stderr)
	// In the flow log and the summary too, beside the capture: a file
	// that could not be written (a full disk) or packets it lacks.
	failures := flowlog.Emitter{Sandbox: "exec", OnEvent: events}
	for _, err := range captures.failed {
		failures.Failure("--capture: " + err.Error())
	}
	if captures.dropped > 0 {
		failures.Failure(fmt.Sprintf("--capture: %d packets dropped: the capture could not keep up", captures.dropped))
	}
	if summary != nil {
		summary.Finish().Render(stderr, o.summaryFormat)
	}
	if o.failOnLeak && code == 0 && violations() > 0 {
		fmt.Fprintf(stderr, "childflow: --fail-on-leak: %d flow(s) were blocked by policy\n", violations())
		return exitLeak
	}
	return code
}

// renderReport renders the flow log at path; name and formatFlag say
// where path and format came from (--report or report's argument,
// --report-format or --format) in errors.
func renderReport(caller *asuser.User, name, path, formatFlag, format string, stdout, stderr io.Writer) int {
	if err := checkChoice(formatFlag, format, report.Formats...); err != nil {
		return usageError(stderr, err)
	}
	f, err := asuser.Call(caller, func() (*os.File, error) { return os.Open(path) })
	if err != nil {
		return usageError(stderr, policy.Usagef("invalid %s %q: %v", name, path, err))
	}
	defer f.Close()
	r, err := report.Read(f)
	if err != nil {
		fmt.Fprintf(stderr, "childflow: %s %s: %v\n", name, path, err)
		return exitFailure
	}
	if err := r.Render(stdout, format); err != nil {
		fmt.Fprintf(stderr, "childflow: %s: %v\n", name, err)
		return exitFailure
	}
	return 0
}

// closeReporting closes an output writer and says if it had to drop
// anything to keep the data path from waiting on the disk.
func closeReporting(w interface {
	Close() error
	Dropped() uint64
}, flag, what string, stderr io.Writer) error {
	err := w.Close()
	if err != nil {
		fmt.Fprintf(stderr, "childflow: %s: %v\n", flag, err)
	}
	if n := w.Dropped(); n > 0 {
		fmt.Fprintf(stderr, "childflow: %s: %d %s dropped (they came faster than they could be written)\n", flag, n, what)
	}
	return err
}

// hidden are the output files' paths, absolute, for the sandbox to cover
// (init's working directory is childflow's, so a relative one that
// cannot be made absolute still names the file).
func hidden(paths []string) []string {
	var out []string
	for _, p := range paths {
		if p == "" {
			continue
		}
		if abs, err := filepath.Abs(p); err == nil {
			p = abs
		}
		out = append(out, p)
	}
	return out
}

// resolvConf points the sandbox at the engine, keeping the host's search
// domains and options.
func resolvConf(plan netplan.Plan, host []byte) string {
	var b strings.Builder
	b.WriteString("# written by childflow: the engine on the gateway answers DNS\n")
	for _, gw := range plan.Gateways() {
		fmt.Fprintf(&b, "nameserver %s\n", gw)
	}
	for _, line := range strings.Split(string(host), "\n") {
		if f := strings.Fields(line); len(f) > 0 && (f[0] == "search" || f[0] == "domain" || f[0] == "options") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// openRegular opens path if it is a regular file this user can open.
func openRegular(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, flowlog.PathReason(err) // the flag's message names the path
	}
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, errors.New("not a regular file")
	}
	return f, nil
}

// reclaimTerminal makes childflow's process group the terminal's
// foreground group again after the command had it.
func reclaimTerminal() {
	signal.Ignore(syscall.SIGTTOU)
	defer signal.Reset(syscall.SIGTTOU)
	unix.IoctlSetPointerInt(0, unix.TIOCSPGRP, unix.Getpgrp())
}
