// Command childflow-hook is the OCI hook (createRuntime, prestart,
// poststop) that attaches annotated containers to the childflow daemon.
package main

import (
	"context"
	"os"

	"github.com/childflow/childflow/hook"
)

func main() {
	os.Exit(hook.Run(context.Background(), os.Args, os.Stdin, os.Stderr))
}
