// Command childflow-runtime is an OCI runtime wrapper: runc or crun with
// childflow's hook added to each container it creates.
package main

import (
	"os"

	shim "github.com/childflow/childflow/runtime-shim"
)

func main() {
	os.Exit(shim.Run(os.Args, os.Stderr))
}
