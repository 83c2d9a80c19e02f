// Command childflow-init is the sandbox's init for `childflow exec`:
// childflow starts it in the new namespaces (from next to its own
// executable). It is a separate, small binary because a Go program's
// start-up grows with what it links, and init's start-up is on the path
// of every sandboxed command.
package main

import (
	"fmt"
	"os"

	"github.com/childflow/childflow/internal/sandbox"
)

func main() {
	if err := sandbox.NotSetid(); err != nil {
		fmt.Fprintln(os.Stderr, "childflow-init:", err)
		os.Exit(2)
	}
	if !sandbox.IsInit() {
		fmt.Fprintln(os.Stderr, "childflow-init: started by childflow exec only")
		os.Exit(2)
	}
	sandbox.Init()
}
