// Package fdpass sends and receives file descriptors over unix sockets
// (SCM_RIGHTS), together with a small message.
package fdpass

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Send writes msg with the given fds attached to the unix socket fd sock.
func Send(sock int, msg []byte, fds ...int) error {
	if len(msg) == 0 {
		msg = []byte{0}
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(sock, msg, oob, nil, 0); err != nil {
		return fmt.Errorf("sendmsg: %w", err)
	}
	return nil
}

// Recv reads one message and the fds attached to it, again when a
// signal interrupts the wait. Received fds are close-on-exec.
func Recv(sock int, maxMsg, maxFDs int) (msg []byte, files []*os.File, err error) {
	return recv(maxMsg, maxFDs, func(buf, oob []byte) (n, oobn int, err error) {
		for {
			n, oobn, _, _, err = unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
			if err != unix.EINTR {
				return n, oobn, err
			}
		}
	})
}

// RecvFile is Recv on a socket in Go's poller (made non-blocking): the
// goroutine waiting for a message parks there and leaves its thread and
// processor to the others, where a blocking read holds them until the
// runtime notices.
func RecvFile(sock *os.File, maxMsg, maxFDs int) (msg []byte, files []*os.File, err error) {
	rc, err := sock.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	return recv(maxMsg, maxFDs, func(buf, oob []byte) (n, oobn int, err error) {
		if perr := rc.Read(func(fd uintptr) bool {
			n, oobn, _, _, err = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC|unix.MSG_DONTWAIT)
			return err != unix.EAGAIN && err != unix.EINTR
		}); perr != nil {
			return 0, 0, perr
		}
		return n, oobn, err
	})
}

// recv reads one message with read. A peer that closed with messages of
// ours unread makes the kernel report a reset once, before the messages
// the peer sent until then (its last word): those are read past it.
func recv(maxMsg, maxFDs int, read func(buf, oob []byte) (n, oobn int, err error)) ([]byte, []*os.File, error) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, Space(maxFDs))
	n, oobn, err := read(buf, oob)
	if errors.Is(err, unix.ECONNRESET) {
		n, oobn, err = read(buf, oob)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("recvmsg: %w", err)
	}
	if n == 0 && oobn == 0 {
		return nil, nil, fmt.Errorf("recvmsg: peer closed the socket")
	}
	files, err := Files(oob[:oobn])
	return buf[:n], files, err
}

// Space is the control-message room for up to n fds.
func Space(n int) int { return unix.CmsgSpace(n * 4) }

// Files turns the SCM_RIGHTS control messages in oob into close-on-exec
// files.
func Files(oob []byte) ([]*os.File, error) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parsing control message: %w", err)
	}
	var files []*os.File
	for _, c := range cmsgs {
		fds, err := unix.ParseUnixRights(&c)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.CloseOnExec(fd)
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("fd%d", fd)))
		}
	}
	return files, nil
}
