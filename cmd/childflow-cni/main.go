// Command childflow-cni is the chained CNI plugin that sandboxes pods
// carrying childflow.dev/ annotations.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/childflow/childflow/cni"
	"github.com/childflow/childflow/internal/version"
)

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.Versions, "childflow-cni "+version.Version)
}
