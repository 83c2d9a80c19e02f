// Package fdpass sends and receives file descriptors over unix sockets
// (SCM_RIGHTS), together with a small message.
package fdpass

import (
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

// Recv reads one message and the fds attached to it. Received fds are
// close-on-exec.
func Recv(sock int, maxMsg, maxFDs int) (msg []byte, files []*os.File, err error) {
	buf := make([]byte, maxMsg)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, _, _, err := unix.Recvmsg(sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, nil, fmt.Errorf("recvmsg: %w", err)
	}
	if n == 0 && oobn == 0 {
		return nil, nil, fmt.Errorf("recvmsg: peer closed the socket")
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, nil, fmt.Errorf("parsing control message: %w", err)
	}
	for _, c := range cmsgs {
		fds, err := unix.ParseUnixRights(&c)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), fmt.Sprintf("fd%d", fd)))
		}
	}
	return buf[:n], files, nil
}
