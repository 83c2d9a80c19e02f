package api

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// oobSpace has room for a few fds; more than one is a protocol error the
// daemon answers, not a leak.
var oobSpace = unix.CmsgSpace(4 * 4)

func unixRights(fd int) []byte { return unix.UnixRights(fd) }

// parseRights turns SCM_RIGHTS control messages into files.
func parseRights(oob []byte) []*os.File {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
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
	return files
}
