package sandbox

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The command shares the caller's terminal, and with it the shell that
// reads the terminal once childflow exits: TIOCSTI pushes bytes into the
// terminal's input as if typed, so a command could leave the shell a line
// to run outside the sandbox, and TIOCLINUX can paste a console selection
// the same way. Kernels still allow TIOCSTI on one's own terminal unless
// built or set otherwise (dev.tty.legacy_tiocsti), so the command's ioctl
// calls with those requests fail with EPERM, as under bubblewrap's and
// Flatpak's filters.

// syscallABI is one system call ABI the kernel runs on this
// architecture: its audit number and its numbers for ioctl.
type syscallABI struct {
	audit uint32
	ioctl []uint32
}

// x32 calls are x86-64's with this bit set in the number.
const x32Bit = 0x40000000

var syscallABIs = map[string][]syscallABI{
	"amd64":   {{unix.AUDIT_ARCH_X86_64, []uint32{16, x32Bit | 16, x32Bit | 514}}, {unix.AUDIT_ARCH_I386, []uint32{54}}},
	"arm64":   {{unix.AUDIT_ARCH_AARCH64, []uint32{29}}, {unix.AUDIT_ARCH_ARM, []uint32{54}}},
	"riscv64": {{unix.AUDIT_ARCH_RISCV64, []uint32{29}}},
}

// deniedIoctls are the requests refused; the same on every ABI above.
var deniedIoctls = []uint32{unix.TIOCSTI, unix.TIOCLINUX}

// terminalFilter is the seccomp program: denied ioctl requests and any
// call from an ABI not listed fail with EPERM, the rest is allowed.
func terminalFilter(abis []syscallABI) []unix.SockFilter {
	const (
		nrOffset   = 0  // seccomp_data.nr
		archOffset = 4  // seccomp_data.arch
		cmdOffset  = 24 // the low half of seccomp_data.args[1]: ioctl's request is an unsigned int, the upper half ignored
	)
	load := func(off uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: off}
	}
	jeq := func(k uint32, jt, jf uint8) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: k, Jt: jt, Jf: jf}
	}
	ret := func(k uint32) unix.SockFilter { return unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: k} }
	allow, deny := ret(unix.SECCOMP_RET_ALLOW), ret(unix.SECCOMP_RET_ERRNO|uint32(unix.EPERM))

	// The request check, the tail of each ABI's block: allowed unless
	// it is one of deniedIoctls.
	check := []unix.SockFilter{load(cmdOffset)}
	for i, req := range deniedIoctls {
		check = append(check, jeq(req, uint8(len(deniedIoctls)-i), 0))
	}
	check = append(check, allow, deny)

	prog := []unix.SockFilter{load(archOffset)}
	for _, abi := range abis {
		n := len(abi.ioctl)
		// Another ABI skips this block: the number load, the n
		// comparisons, the allow and the check.
		prog = append(prog, jeq(abi.audit, 0, uint8(1+n+1+len(check))), load(nrOffset))
		for i, nr := range abi.ioctl {
			prog = append(prog, jeq(nr, uint8(n-i), 0)) // to the check, past the allow
		}
		prog = append(prog, allow)
		prog = append(prog, check...)
		prog = append(prog, load(archOffset)) // for the next block
	}
	return append(prog[:len(prog)-1], deny)
}

// hasControllingTerminal says whether init, and so the command, has a
// controlling terminal. Without CAP_SYS_ADMIN, TIOCSTI works only on that
// one, and a terminal in another session cannot be made one's own: with
// none there is no shell to type into, and the filter, whose install (a
// JIT compile) costs 0.2-0.4 ms of every start, is left out. Any answer
// but "none" counts as a terminal.
func hasControllingTerminal() bool {
	fd, err := unix.Open("/dev/tty", unix.O_RDONLY|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err == nil {
		unix.Close(fd)
	}
	return err != unix.ENXIO
}

// denyTerminalInjection installs the filter on the calling thread, which
// forks the command; no_new_privs must be set.
func denyTerminalInjection() error {
	abis, ok := syscallABIs[runtime.GOARCH]
	if !ok {
		return fmt.Errorf("no terminal filter for %s: TIOCSTI would let the command type into the caller's shell", runtime.GOARCH)
	}
	prog := terminalFilter(abis)
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if _, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog))); e != 0 {
		return fmt.Errorf("installing the terminal filter: %w", e)
	}
	return nil
}
