package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/fdpass"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/tun"
	"github.com/childflow/childflow/internal/version"
)

// ctrlFD is the control socket init inherits (ExtraFiles[0]).
const ctrlFD = 3

// Init runs the sandbox's init and never returns.
func Init() {
	// Init's threads other than the command's keep their capabilities
	// (full root ones under root), and the command runs as init's user:
	// a dumpable init could be traced by it (PTRACE_ATTACH to pid 1) and
	// made to undo the sandbox. Not dumpable, tracing it takes
	// CAP_SYS_PTRACE, which the command has not. The command's execve
	// makes it dumpable again.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		fail(fmt.Errorf("making init undumpable: %w", err))
	}
	sigs := RegisterForwardedSignals()
	parent := os.Getenv(initEnv)
	os.Unsetenv(initEnv)
	unix.CloseOnExec(ctrlFD)
	if parent != version.Version {
		exe, _ := os.Executable()
		fail(fmt.Errorf("%s is version %s but childflow is %s: install both from one build", exe, version.Version, parent))
	}
	spec, err := receiveSpec()
	if err != nil {
		fail(err)
	}
	spec.Command = os.Args[1:]
	if spec.CallerFD3 > 0 {
		unix.CloseOnExec(spec.CallerFD3) // the command gets it as fd 3 only
	}
	tunFile, covers, err := setup(spec)
	if err != nil {
		fail(err)
	}
	if tunFile == nil {
		err = fdpass.Send(ctrlFD, []byte(readyMsg))
	} else {
		fds := []int{int(tunFile.Fd())}
		// For the flow log's process attribution (procnet.Finder).
		diag, derr := procnet.OpenDiag()
		if derr == nil {
			fds = append(fds, int(diag.Fd()))
		}
		err = fdpass.Send(ctrlFD, []byte("tun"), fds...)
		tunFile.Close()
		diag.Close()
	}
	if err != nil {
		os.Exit(125)
	}
	// While the engine starts, get everything but the fork done.
	start := prepareCommand(spec, sigs)
	// Wait for the engine. EOF means the parent died: leave.
	if msg, _, err := fdpass.Recv(ctrlFD, 16, 0); err != nil || string(msg) != "go" {
		os.Exit(125)
	}
	go keepCovering(covers)
	code := start()
	// Childflow ends its side while the kernel takes the sandbox down.
	fdpass.Send(ctrlFD, fmt.Appendf(nil, exitedMsg, code))
	os.Exit(code)
}

// receiveSpec reads the spec childflow sends in chunks (Sandbox.Build).
func receiveSpec() (Spec, error) {
	var spec Spec
	var raw []byte
	for {
		msg, _, err := fdpass.Recv(ctrlFD, 1+specChunk, 0)
		if err != nil || len(msg) == 0 {
			os.Exit(125) // childflow is gone
		}
		raw = append(raw, msg[1:]...)
		if msg[0] != 'm' {
			break
		}
	}
	if err := json.Unmarshal(raw, &spec); err != nil {
		return spec, fmt.Errorf("decoding sandbox spec: %w", err)
	}
	return spec, nil
}

// fail sends err to the parent in place of the TUN and exits.
func fail(err error) {
	fdpass.Send(ctrlFD, []byte(err.Error()))
	os.Exit(125)
}

func setup(spec Spec) (*os.File, []etcCover, error) {
	// The network and the mounts do not depend on each other: built side
	// by side, on two threads of this process and its namespaces (the
	// mounts, shorter, on the one that takes a moment to start).
	type mounts struct {
		covers []etcCover
		err    error
	}
	mounted := make(chan mounts, 1)
	go func() {
		covers, err := setupMounts(spec)
		mounted <- mounts{covers, err}
	}()
	tun, err := setupNetwork(spec)
	m := <-mounted
	if err == nil {
		err = m.err
	}
	if err != nil {
		tun.Close()
		return nil, nil, err
	}
	// Last: the network's settings are written under /proc/sys.
	if !spec.Rootless && len(spec.RunAs) == 0 {
		if err := kernelFilesReadOnly(); err != nil {
			tun.Close()
			return nil, nil, err
		}
	}
	return tun, m.covers, nil
}

func setupNetwork(spec Spec) (*os.File, error) {
	var f *os.File
	if !spec.Veth {
		var err error
		if f, err = openTUN(spec.Plan); err != nil {
			return nil, err
		}
	}
	// The command has no CAP_NET_RAW; unprivileged ICMP sockets let ping
	// work for the command's group (the only one mapped when rootless).
	// The sysctl is per network namespace: the host's is untouched.
	gid := os.Getgid()
	if err := os.WriteFile("/proc/sys/net/ipv4/ping_group_range", fmt.Appendf(nil, "%d %d", gid, gid), 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("enabling ping sockets in the sandbox: %w", err)
	}
	return f, nil
}

func setupMounts(spec Spec) ([]etcCover, error) {
	// Nothing we mount may propagate back to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return nil, fmt.Errorf("making mounts private: %w", err)
	}
	covers, err := overlayEtc(spec)
	if err != nil {
		return nil, err
	}
	// After overlayEtc, whose scratch tmpfs on /tmp would cover them.
	if err := coverHostSockets(spec.HostSockets); err != nil {
		return nil, err
	}
	if err := hide(spec.Hidden); err != nil {
		return nil, err
	}
	// A fresh /proc shows only the sandbox's processes. Where /proc is
	// partly masked (inside a container) the kernel refuses a user one;
	// the host's view is then kept: the command sees the processes
	// there, but cannot trace them or open their memory, as they are in
	// a user namespace above its own (TestHostProcGrantsNothing).
	unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "")
	return covers, nil
}

// kernelFilesReadOnly makes the kernel's settings read-only for a command
// that runs as uid 0 (childflow run by root itself, not through sudo). It
// has no capabilities, but most files under /proc/sys and /sys check only
// that their owner writes them: core_pattern would have the kernel run a
// program of the command's choosing as root, outside the sandbox, at the
// next crash; sysrq-trigger reboots the host. As in a container.
func kernelFilesReadOnly() error {
	for _, path := range []string{"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/sys"} {
		if _, err := os.Lstat(path); err != nil {
			continue // /proc/bus and /proc/irq are not on every kernel
		}
		// Bound onto itself, so that only this mount is changed, not the
		// /proc or /sys it is part of; recursively for /sys's cgroups,
		// debugfs and the rest.
		if err := unix.Mount(path, path, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("binding %s: %w", path, err)
		}
		if err := unix.MountSetattr(unix.AT_FDCWD, path, unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			return fmt.Errorf("making %s read-only: %w", path, err)
		}
	}
	return nil
}

// openTUN creates and configures the sandbox's TUN. It is persistent, so
// that the engine's close of its fd returns at once: the device then goes
// with the namespace, which the kernel tears down in the background once
// init is gone. A last close would unregister it synchronously, 10-20 ms
// on every run.
func openTUN(plan netplan.Plan) (*os.File, error) {
	f, err := tun.Open(plan.Interface)
	if err != nil {
		return nil, err
	}
	if err = tun.Configure(plan); err == nil {
		err = tun.SetPersist(f, true)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// overlayEtc binds the sandbox's resolv.conf (and the --hosts-file) over
// the host's, and returns the covers for keepCovering. The generated file
// lives on a tmpfs that is mounted for a moment on /tmp of the sandbox
// and detached again, so nothing is ever written to the host's disk.
func overlayEtc(spec Spec) ([]etcCover, error) {
	var covers []etcCover
	cover := func(src, dst string) error {
		target, err := bindOver(src, dst)
		if err != nil {
			return err
		}
		if c, ok := keepCover(dst, target); ok {
			covers = append(covers, c)
		}
		return nil
	}
	// The hosts file first: it may itself live under /tmp.
	if spec.HostsFile != "" {
		if err := cover(spec.HostsFile, "/etc/hosts"); err != nil {
			return nil, err
		}
	}
	const scratch = "/tmp"
	if err := unix.Mount("childflow", scratch, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=64k,mode=0755"); err != nil {
		return nil, fmt.Errorf("mounting scratch tmpfs on %s: %w", scratch, err)
	}
	defer unix.Unmount(scratch, unix.MNT_DETACH)
	resolv := filepath.Join(scratch, "resolv.conf")
	if err := os.WriteFile(resolv, []byte(spec.ResolvConf), 0o644); err != nil {
		return nil, fmt.Errorf("writing sandbox resolv.conf: %w", err)
	}
	if err := cover(resolv, "/etc/resolv.conf"); err != nil {
		return nil, err
	}
	return covers, nil
}

// hide covers each of paths with /dev/null, read-only and nodev, so that
// opening it fails for reading and writing; a mount point cannot be
// removed, renamed or replaced either. Each directory above it is bound
// onto itself for the same reason: moving one away, and a forged file
// into its place, would move the record out of the user's sight.
func hide(paths []string) error {
	if len(paths) == 0 {
		return nil
	}
	// The working directory is re-entered at the end: below a pinned
	// directory it would still be the bind's underside, where the
	// covers are not.
	cwd, err := os.Getwd()
	if err != nil {
		return err
	}
	pinned := map[string]bool{}
	for _, path := range paths {
		real, err := filepath.EvalSymlinks(path)
		if err != nil {
			return fmt.Errorf("resolving %s: %w", path, err)
		}
		var dirs []string
		for d := filepath.Dir(real); d != "/" && !pinned[d]; d = filepath.Dir(d) {
			dirs = append(dirs, d)
			pinned[d] = true
		}
		for _, d := range slices.Backward(dirs) { // from the top down
			if err := unix.Mount(d, d, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				return fmt.Errorf("pinning %s: %w", d, err)
			}
		}
		if _, err := bindOver("/dev/null", real); err != nil {
			return err
		}
	}
	return os.Chdir(cwd)
}

// bindOver binds src read-only over dst, or over the file dst's symlink
// names, which it returns.
func bindOver(src, dst string) (string, error) {
	// resolv.conf is often a symlink (systemd-resolved): bind over its
	// target, creating nothing.
	target, err := filepath.EvalSymlinks(dst)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", dst, err)
	}
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return "", fmt.Errorf("binding %s over %s: %w", src, target, err)
	}
	// Read-only, so the command cannot rewrite its resolver.
	if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return "", fmt.Errorf("making %s read-only: %w", target, err)
	}
	return target, nil
}

// RegisterForwardedSignals registers ForwardedSignals in the background,
// in childflow and in init: each is a round trip to the runtime's signal
// thread, and the eight took as long as building the sandbox's network.
// The channel it returns gives, once they are registered, the one they
// arrive on (never unregistered: both exit with the command); those that
// come before the command starts are forwarded right after.
func RegisterForwardedSignals() <-chan chan os.Signal {
	registered := make(chan chan os.Signal, 1)
	go func() {
		sigs := make(chan os.Signal, 16)
		signal.Notify(sigs, ForwardedSignals()...)
		registered <- sigs
	}()
	return registered
}

// prepareCommand drops this thread's privileges, waits for the signals
// to forward to be registered and finds the command; the start it
// returns forks the command, forwards signals to it and returns its exit
// code once it exits.
func prepareCommand(spec Spec, registered <-chan chan os.Signal) (start func() int) {
	// Never unlocked: this thread ends up without privileges, and the
	// command is forked from it.
	runtime.LockOSThread()
	if err := dropPrivileges(spec.RunAs); err != nil {
		return func() int {
			fmt.Fprintf(os.Stderr, "childflow: dropping privileges: %v\n", err)
			return 125
		}
	}
	if hasControllingTerminal() {
		if err := denyTerminalInjection(); err != nil {
			return func() int {
				fmt.Fprintf(os.Stderr, "childflow: %v\n", err)
				return 125
			}
		}
	}
	sigs := <-registered
	path, err := exec.LookPath(spec.Command[0])
	if err != nil {
		return func() int {
			fmt.Fprintf(os.Stderr, "childflow: %v\n", err)
			if errors.Is(err, exec.ErrNotFound) || errors.Is(err, os.ErrNotExist) {
				return 127
			}
			return 126
		}
	}
	return func() int { return runCommand(spec, path, sigs) }
}

// runCommand forks the command at path from this (locked, unprivileged)
// thread, forwards sigs to it and returns its exit code once it exits.
func runCommand(spec Spec, path string, sigs chan os.Signal) int {
	attr := &syscall.SysProcAttr{}
	if spec.Foreground {
		// Own foreground process group: ^C and ^Z reach the command only,
		// and job-control shells work.
		attr.Foreground = true
		attr.Ctty = 0
	}
	// syscall.ForkExec rather than os/exec: the command's start is on
	// every run's path, and os/exec first forks a probe process.
	files := []uintptr{0, 1, 2}
	if spec.CallerFD3 > 0 {
		files = append(files, uintptr(spec.CallerFD3))
	}
	pid, err := syscall.ForkExec(path, spec.Command, &syscall.ProcAttr{Env: os.Environ(), Files: files, Sys: attr})
	if err != nil {
		fmt.Fprintf(os.Stderr, "childflow: %s: %v\n", spec.Command[0], err)
		return 126
	}
	go func() {
		for s := range sigs {
			unix.Kill(pid, s.(syscall.Signal))
		}
	}()
	go followResumes(pid, spec.Foreground)
	// As PID 1, init reaps every orphan; the command's status is ours.
	// A stop of the command is childflow's to follow (Sandbox.followStops).
	for {
		var ws unix.WaitStatus
		reaped, err := unix.Wait4(-1, &ws, unix.WUNTRACED, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 125
		}
		switch {
		case reaped != pid:
		case ws.Stopped():
			fdpass.Send(ctrlFD, fmt.Appendf(nil, stoppedMsg, int(ws.StopSignal())))
		case ws.Signaled():
			return 128 + int(ws.Signal())
		default:
			return ws.ExitStatus()
		}
	}
}

// followResumes continues the stopped command when childflow is
// continued: with the terminal handed to it first, in the foreground;
// otherwise left to the shell, so a read of it stops the command again,
// as it stops a background job.
func followResumes(pid int, foreground bool) {
	// The command leads its own group when it started in the terminal's
	// foreground; otherwise it shares init's (every process here).
	group, everyone := pid, -pid
	if !foreground {
		group, everyone = unix.Getpgrp(), -1
	}
	// Init's own group is in the background: setting the terminal's
	// foreground group would stop it.
	signal.Ignore(syscall.SIGTTOU)
	for {
		msg, _, err := fdpass.Recv(ctrlFD, 16, 0)
		if err != nil {
			return
		}
		switch string(msg) {
		case contFgMsg:
			unix.IoctlSetPointerInt(0, unix.TIOCSPGRP, group)
			unix.Kill(everyone, syscall.SIGCONT)
		case contBgMsg:
			unix.Kill(everyone, syscall.SIGCONT)
		}
	}
}

// ForwardedSignals are the signals childflow passes on to the command,
// through init: those a wrapper like env or timeout would let reach it,
// less any the caller started childflow with ignored. Those stay ignored,
// in childflow, init and the command, as across env: `nohup childflow --
// cmd` survives a hangup, and a background job of a non-interactive
// shell ^C. (Go keeps an ignored SIGHUP or SIGINT ignored until Notify.)
func ForwardedSignals() []os.Signal {
	var out []os.Signal
	for _, s := range []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH, syscall.SIGCONT} {
		if !signal.Ignored(s) {
			out = append(out, s)
		}
	}
	return out
}

// becomeUser switches this thread (only: the raw syscalls, unlike
// syscall.Setuid, do not touch init's other threads) to uid and gid with no
// supplementary groups.
func becomeUser(uid, gid int) error {
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return fmt.Errorf("setgroups: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(gid), uintptr(gid), uintptr(gid)); e != 0 {
		return fmt.Errorf("setresgid: %w", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), uintptr(uid)); e != 0 {
		return fmt.Errorf("setresuid: %w", e)
	}
	return nil
}

// dropPrivileges leaves the command no way to undo the sandbox: no
// capabilities in any set, none regained through execve of a root, setuid
// or file-capability binary (no_new_privs, locked securebits). It acts on
// the calling thread only (credentials are per thread): the caller locks
// its OS thread and forks the command from it, so the command inherits
// exactly these credentials, with or without cgo. The bounding set is
// left as it is: nothing can be gained from it any more, and emptying it
// makes the kernel refuse to exec binaries with file capabilities (ping).
//
// runAs, if set ([uid, gid]), is the user to become first.
func dropPrivileges(runAs []int) error {
	prctl := func(op, arg uintptr) syscall.Errno {
		_, _, e := unix.RawSyscall6(unix.SYS_PRCTL, op, arg, 0, 0, 0, 0)
		return e
	}
	// linux/securebits.h: noroot, no_setuid_fixup and no_cap_ambient_raise,
	// each with its lock bit. keep_caps stays unlocked: ping sets it, and
	// with no capabilities to keep it grants nothing.
	const secure = 0b1100_1111
	if e := prctl(unix.PR_SET_SECUREBITS, secure); e != 0 {
		return fmt.Errorf("setting securebits: %w", e)
	}
	// With no_setuid_fixup the switch keeps the capabilities the rest of
	// this function needs; they are all cleared below.
	if len(runAs) == 2 {
		if err := becomeUser(runAs[0], runAs[1]); err != nil {
			return fmt.Errorf("running as uid %d gid %d: %w", runAs[0], runAs[1], err)
		}
	}
	if e := prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL); e != 0 {
		return fmt.Errorf("clearing ambient capabilities: %w", e)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if _, _, e := unix.RawSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0); e != 0 {
		return fmt.Errorf("clearing capabilities: %w", e)
	}
	if e := prctl(unix.PR_SET_NO_NEW_PRIVS, 1); e != 0 {
		return fmt.Errorf("setting no_new_privs: %w", e)
	}
	return nil
}
