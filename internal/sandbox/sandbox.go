// Package sandbox builds the namespaces of `childflow exec`: the parent
// re-executes itself (/proc/self/exe) as the sandbox's init in new user
// (when not root), mount, network and PID namespaces. Init creates the
// TUN, passes its fd back over SCM_RIGHTS, waits for the engine, drops
// every privilege and runs the command. When the command exits, init
// exits, and the kernel kills whatever the command left behind.
package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/fdpass"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/version"
)

// initEnv marks the re-executed process as the sandbox's init; its value
// is childflow's version: a childflow-init from another build may not
// read the spec the same way, so it refuses.
const initEnv = "_CHILDFLOW_SANDBOX_INIT"

// Spec is what init needs to build the sandbox, sent to it over the
// control socket once it runs (Build).
type Spec struct {
	Plan netplan.Plan `json:"plan"`
	// Command is init's argv after its name (Start's), not part of the
	// JSON.
	Command    []string `json:"-"`
	ResolvConf string   `json:"resolv_conf"`
	HostsFile  string   `json:"hosts_file,omitempty"`
	// HostSockets are the paths of the host's unix sockets, for init
	// to cover (hostsockets.go); Build fills it in.
	HostSockets []string `json:"host_sockets,omitempty"`
	// Hidden are the files childflow writes about the sandbox (flow log,
	// captures), absolute: covered in the sandbox, so that the command
	// can neither read nor rewrite the record of what it does.
	Hidden []string `json:"hidden,omitempty"`
	// Rootless: init runs in a new user namespace mapping only the
	// caller's uid and gid (Start's).
	Rootless bool `json:"rootless"`
	// RunAs, when set (root started through sudo), is the user the
	// command runs as: [uid, gid].
	RunAs []int `json:"run_as,omitempty"`
	// Foreground: childflow's process group has the terminal on stdin
	// in the foreground, so the command takes it (its own group, ^C
	// and ^Z reach it alone). A background childflow leaves it be.
	Foreground bool `json:"foreground,omitempty"`
	// Veth: no TUN; the rootful backend moves a veth end into the
	// namespace and configures it from outside.
	Veth bool `json:"veth,omitempty"`
	// CallerFD3 is where init finds the fd 3 childflow was given, if
	// any, to hand to the command as its fd 3 (init's own fd 3 is the
	// control socket); Build fills it in.
	CallerFD3 int `json:"caller_fd3,omitempty"`
}

// Sandbox is the parent's handle on a started sandbox.
type Sandbox struct {
	initProc *process
	ctrl     *os.File
	// resume: the command was stopped and childflow stopped itself in
	// turn (followStops); the next SIGCONT continues the command.
	resume    atomic.Bool
	stopsDone chan struct{}
	// exited is closed once init has said the command exited, with
	// code (followStops).
	exited chan struct{}
	code   int
	// terminal: the command has the terminal's foreground, given by init
	// at the start (Spec.Foreground) or on fg, lost when it stops or on bg.
	terminal  atomic.Bool
	rootless  bool
	callerFD3 int
	veth      bool // Spec.Veth: init hands over no TUN
	// TUN is the sandbox's cf0 queue, for the engine (nil with Spec.Veth).
	TUN *os.File
	// SocketDiag is a sock_diag socket inside the sandbox (nil if init
	// could not open one), for procnet.Finder.
	SocketDiag *os.File
}

// readyMsg is init's word that its namespaces are set up (Spec.Veth).
const readyMsg = "ready"

// Start spawns init for command in new mount, network and PID namespaces
// (and a user namespace, rootless). Init starts up while the caller works
// out the rest of the spec and hands it over (Build); then init builds
// the sandbox while the caller gets its side ready (the engine); Ready
// waits for that. The command does not run until Run is called.
func Start(command []string, rootless bool) (sb *Sandbox, err error) {
	// Non-blocking on childflow's side, which waits in Go's poller.
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("creating control socket: %w", err)
	}
	if err := unix.SetNonblock(fds[1], false); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, fmt.Errorf("creating control socket: %w", err)
	}
	parent, child := os.NewFile(uintptr(fds[0]), "ctrl"), os.NewFile(uintptr(fds[1]), "ctrl-child")
	defer child.Close()
	defer func() {
		if err != nil {
			parent.Close()
		}
	}()
	sb = &Sandbox{ctrl: parent, rootless: rootless}
	// The command sees the fds childflow was given, as under env or
	// timeout (a shell's 3>file, make's jobserver): those from 4 up are
	// not close-on-exec, unlike childflow's own, and pass through init
	// as they are; fd 3 goes aside, to a number init inherits.
	if flags, err := unix.FcntlInt(3, unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
		aside, err := unix.FcntlInt(3, unix.F_DUPFD, 4)
		if err != nil {
			return nil, fmt.Errorf("passing on fd 3: %w", err)
		}
		defer unix.Close(aside)
		sb.callerFD3 = aside
	}
	attr := &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWNET | syscall.CLONE_NEWPID,
		// If childflow dies, even by SIGKILL, init dies, and with it
		// the PID namespace, the TUN and the network namespace.
		Pdeathsig: syscall.SIGKILL,
		// A process group of its own, and so the command's: a signal
		// to childflow's group (a shell's `kill %1`, a CI runner's
		// cancel) reaches the command once, forwarded by childflow,
		// rather than from the kernel and from each forwarder too.
		Setpgid: true,
	}
	if rootless {
		uid, gid := os.Getuid(), os.Getgid()
		attr.Cloneflags |= syscall.CLONE_NEWUSER
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: uid, HostID: uid, Size: 1}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: gid, HostID: gid, Size: 1}}
		attr.GidMappingsEnableSetgroups = false
		// Init keeps the caller's uid, so it needs these as ambient
		// capabilities to survive its execve; it drops them before the
		// command runs.
		attr.AmbientCaps = []uintptr{unix.CAP_NET_ADMIN, unix.CAP_SYS_ADMIN, unix.CAP_SETPCAP}
	}
	// syscall.ForkExec rather than os/exec, whose first start in a
	// process forks a probe process too (~0.25 ms of every run).
	sb.initProc, err = startProcess(initPath(), append([]string{"childflow-init"}, command...), &syscall.ProcAttr{
		Env:   append(withoutInitMarker(os.Environ()), initEnv+"="+version.Version),
		Files: []uintptr{0, 1, 2, child.Fd()}, // the control socket is ctrlFD
		Sys:   attr,
	})
	if err != nil {
		return nil, fmt.Errorf("starting sandbox init: %w", err)
	}
	return sb, nil
}

// specChunk bounds one message of the spec: a host with many unix
// sockets lists them all.
const specChunk = 32 << 10

// Build hands init the spec (Command and Rootless are Start's), and init
// builds the sandbox. On an error init is gone.
func (sb *Sandbox) Build(spec Spec) (err error) {
	defer func() {
		if err != nil {
			sb.Kill()
			sb.Wait()
		}
	}()
	spec.Rootless, spec.CallerFD3, sb.veth = sb.rootless, sb.callerFD3, spec.Veth
	sb.terminal.Store(spec.Foreground)
	if spec.HostSockets, err = hostSocketPaths(); err != nil {
		return err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	for more := true; more; {
		n := min(len(b), specChunk)
		more = n < len(b)
		flag := byte('e')
		if more {
			flag = 'm'
		}
		if err := sb.send(append([]byte{flag}, b[:n]...)); err != nil {
			// Init stopped before reading it: say why, where it did
			// (what it sent stays readable once it is gone).
			sb.Kill()
			if why, _, rerr := fdpass.RecvFile(sb.ctrl, 4096, 0); rerr == nil && len(why) > 0 {
				return fmt.Errorf("%s", why)
			}
			return fmt.Errorf("handing sandbox init its spec: %w", err)
		}
		b = b[n:]
	}
	return nil
}

// send sends msg to init, waiting in the poller while init's queue is
// full (the spec's chunks, before init reads them). The file's reference
// keeps the descriptor open meanwhile: a signal forwarded as Wait closes
// the socket must not send to its number, another file's by then.
func (sb *Sandbox) send(msg []byte) error {
	rc, err := sb.ctrl.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = fdpass.Send(int(fd), msg)
		return !errors.Is(serr, unix.EAGAIN)
	}); err != nil {
		return err
	}
	return serr
}

// Ready waits for init to have built the namespaces and takes the TUN it
// hands over. On an error init is gone.
func (sb *Sandbox) Ready() (err error) {
	defer func() {
		if err != nil {
			sb.Kill()
			sb.Wait()
		}
	}()
	msg, files, err := fdpass.RecvFile(sb.ctrl, 4096, 2)
	if err != nil {
		return fmt.Errorf("sandbox init failed before handing over the tun: %w", err)
	}
	if sb.veth && string(msg) == readyMsg && len(files) == 0 {
		return nil
	}
	if len(files) == 0 || string(msg) != "tun" {
		for _, f := range files {
			f.Close()
		}
		// Init sends its error message instead of an fd.
		return fmt.Errorf("%s", msg)
	}
	sb.TUN = files[0]
	if len(files) > 1 {
		sb.SocketDiag = files[1]
	}
	return nil
}

// initPath is the small childflow-init installed beside this executable,
// or, where there is none (a lone `go install`), this executable itself,
// which runs the same init when it finds the marker in its environment.
func initPath() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "childflow-init")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return "/proc/self/exe"
}

// Pid is init's pid in the caller's namespace.
func (sb *Sandbox) Pid() int { return sb.initProc.pid }

// Run lets init start the command.
func (sb *Sandbox) Run() error {
	if err := sb.send([]byte("go")); err != nil {
		return fmt.Errorf("starting the command: %w", err)
	}
	sb.stopsDone, sb.exited = make(chan struct{}), make(chan struct{})
	go sb.followStops()
	return nil
}

// Messages between init and childflow once the command runs: init says
// the command stopped (and with which signal), childflow says continue
// it, in the terminal's foreground or not.
const (
	stoppedMsg = "stopped %d"
	exitedMsg  = "exited %d"
	contFgMsg  = "cont fg"
	contBgMsg  = "cont bg"
)

// followStops stops childflow with the signal that stopped the command
// (^Z, SIGSTOP, a background read of the terminal), so that a
// job-control shell sees its job stop and takes the terminal back, as it
// would with the command run directly. It returns when init exits.
func (sb *Sandbox) followStops() {
	defer close(sb.stopsDone)
	for {
		msg, _, err := fdpass.RecvFile(sb.ctrl, 32, 0)
		if err != nil {
			return
		}
		var sig, code int
		if _, err := fmt.Sscanf(string(msg), exitedMsg, &code); err == nil {
			sb.code = code
			close(sb.exited)
			continue
		}
		if _, err := fmt.Sscanf(string(msg), stoppedMsg, &sig); err == nil {
			sb.terminal.Store(false) // the shell takes it back
			sb.resume.Store(true)
			unix.Kill(unix.Getpid(), syscall.Signal(sig))
		}
	}
}

// Signal forwards sig to the command (through init). The SIGCONT that
// continues childflow after the command stopped continues the command,
// handing it the terminal again when childflow has it (fg, not bg).
func (sb *Sandbox) Signal(sig os.Signal) error {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return fmt.Errorf("cannot forward %v", sig)
	}
	if s == syscall.SIGCONT && sb.resume.Swap(false) {
		fg := InForeground()
		sb.terminal.Store(fg)
		msg := contBgMsg
		if fg {
			msg = contFgMsg
		}
		return sb.send([]byte(msg))
	}
	return sb.initProc.signal(s)
}

// CommandHasTerminal reports whether the command was last given the
// terminal's foreground, which childflow then takes back when it ends.
func (sb *Sandbox) CommandHasTerminal() bool { return sb.terminal.Load() }

// InForeground reports whether stdin is a terminal whose foreground
// process group is childflow's: a job started with & is not, and must
// not take the terminal from the shell.
func InForeground() bool {
	pgrp, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	return err == nil && pgrp == unix.Getpgrp()
}

// Kill kills the whole sandbox.
func (sb *Sandbox) Kill() { sb.initProc.signal(syscall.SIGKILL) }

// Exited waits, after Run, for the command to exit and returns its exit
// code. Init says so before it exits, so that childflow ends its side
// (the engine) while init takes the sandbox down; Wait waits for that.
func (sb *Sandbox) Exited() int {
	select {
	case <-sb.exited:
		return sb.code
	case <-sb.stopsDone: // init is gone without a word (killed)
		return sb.Wait()
	}
}

// Wait waits for init, and with it every process of the sandbox, to be
// gone, and returns the command's exit code: its status, or 128+N when
// it was killed by signal N.
func (sb *Sandbox) Wait() int {
	ws, err := sb.initProc.wait()
	if sb.stopsDone != nil {
		<-sb.stopsDone // init's end of ctrl closed with it
	}
	sb.ctrl.Close()
	if err != nil {
		return 127
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// process is init, started without os/exec. Its pid is signalled only
// while it cannot name another process: wait learns that init exited
// without reaping it, and reaps it only once signal will no longer use
// the pid.
type process struct {
	pid    int
	mu     sync.Mutex
	exited bool
	once   sync.Once
	status syscall.WaitStatus
	err    error
	reaped chan struct{} // closed by wait
}

// startProcess starts a process whose parent-death signal (Pdeathsig)
// comes only when childflow ends. The kernel sends it when the thread
// that forked the process ends, and Go's runtime ends a thread whose
// goroutine locked it and returned (asuser.Do's, which opens the
// caller's files): init forked from a thread such a goroutine ran on
// next was killed before it handed over the TUN. The thread that forks
// stays locked to a goroutine of its own, which nothing else runs on,
// until the process is reaped.
func startProcess(path string, argv []string, attr *syscall.ProcAttr) (*process, error) {
	p := &process{reaped: make(chan struct{})}
	forked := make(chan error)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var err error
		p.pid, err = syscall.ForkExec(path, argv, attr)
		forked <- err
		if err == nil {
			<-p.reaped
		}
	}()
	if err := <-forked; err != nil {
		return nil, err
	}
	return p, nil
}

func (p *process) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return os.ErrProcessDone
	}
	return syscall.Kill(p.pid, sig)
}

func (p *process) wait() (syscall.WaitStatus, error) {
	p.once.Do(func() {
		var info unix.Siginfo
		ignoringEINTR(func() error { return unix.Waitid(unix.P_PID, p.pid, &info, unix.WEXITED|unix.WNOWAIT, nil) })
		p.mu.Lock()
		p.exited = true
		p.mu.Unlock()
		p.err = ignoringEINTR(func() error {
			_, err := syscall.Wait4(p.pid, &p.status, 0, nil)
			return err
		})
		if p.reaped != nil {
			close(p.reaped)
		}
	})
	return p.status, p.err
}

func ignoringEINTR(call func() error) error {
	for {
		if err := call(); err != unix.EINTR {
			return err
		}
	}
}

// withoutInitMarker drops a marker already in the environment: init reads
// the first one, and one the caller set would be checked instead of ours.
// (The spec itself comes over the control socket, never from there.)
func withoutInitMarker(env []string) []string {
	return slices.DeleteFunc(env, func(kv string) bool { return strings.HasPrefix(kv, initEnv+"=") })
}

// IsInit reports whether this process is a sandbox init: the first
// process of a PID namespace, started with the marker. Run any other way (the
// variable set in a root shell's environment), init's mounts would
// change the host's.
func IsInit() bool { return os.Getenv(initEnv) != "" && os.Getpid() == 1 }

// NotSetid refuses a setuid or setgid start. Installed so, childflow
// would do root's work on the caller's say (the environment, SUDO_UID)
// and leave the command root's effective uid, which owns root's files;
// sudo, which resets the environment, is the way.
func NotSetid() error {
	if uid, euid, gid, egid := os.Getuid(), os.Geteuid(), os.Getgid(), os.Getegid(); uid != euid || gid != egid {
		return fmt.Errorf("refusing to run setuid or setgid (uid %d, euid %d, gid %d, egid %d): run it through sudo", uid, euid, gid, egid)
	}
	return nil
}
