// Package cni is childflow-cni, a chained CNI plugin: for a pod with
// childflow.dev/ annotations (handed over by containerd's CRI through the
// io.kubernetes.cri.pod-annotations capability) it puts cf0 into the pod's
// network namespace and attaches it to the node daemon; every other pod
// passes through untouched. Cluster ranges (pod and service CIDRs, node
// addresses) stay on the pod's main interface unless allThroughEngine is
// set. Fail closed: an annotated pod that cannot be sandboxed gets an
// error, never plain network.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/internal/attach"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/annotations"
)

// errPluginNotAvailable is CNI 1.1's STATUS code for "not ready"; this
// library version has no name for it.
const errPluginNotAvailable = 50

// Source marks the daemon's sandboxes that this plugin attached.
const Source = api.SourceCNI

// NetConf is the plugin's configuration in the conflist.
type NetConf struct {
	types.NetConf
	// ClusterCIDRs stay on the pod's main interface: pod and service
	// ranges, node addresses.
	ClusterCIDRs []string `json:"clusterCIDRs,omitempty"`
	// AllThroughEngine sends cluster traffic through the engine too.
	AllThroughEngine bool   `json:"allThroughEngine,omitempty"`
	Socket           string `json:"socket,omitempty"`
	StateDir         string `json:"stateDir,omitempty"`

	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// Funcs are the plugin's commands for skel.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, GC: cmdGC, Status: cmdStatus}
}

// Versions the plugin speaks.
var Versions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

func parseConf(data []byte) (*NetConf, []netip.Prefix, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "parsing the network configuration", err.Error())
	}
	if err := version.ParsePrevResult(&conf.NetConf); err != nil {
		return nil, nil, types.NewError(types.ErrDecodingFailure, "parsing prevResult", err.Error())
	}
	if conf.Socket == "" {
		conf.Socket = api.DefaultSocket
	}
	if conf.StateDir == "" {
		conf.StateDir = api.DefaultStateDir
	}
	var keep []netip.Prefix
	if !conf.AllThroughEngine {
		var err error
		if keep, err = policy.ParseCIDRs("clusterCIDRs", conf.ClusterCIDRs); err != nil {
			return nil, nil, types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
		}
	}
	return conf, keep, nil
}

func (c *NetConf) node() attach.Node {
	return attach.Node{Socket: c.Socket, StateDir: c.StateDir}
}

// guards are the node's host guards, locked in the daemon's state directory.
func (c *NetConf) guards() steer.Guards {
	return steer.Guards{Dir: c.StateDir}
}

// podLabels are the pod's names from CNI_ARGS (K8S_POD_NAMESPACE, ...).
func podLabels(cniArgs string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(cniArgs, ";") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "K8S_POD_NAMESPACE":
			out["pod_namespace"] = v
		case "K8S_POD_NAME":
			out["pod_name"] = v
		case "K8S_POD_UID":
			out["pod_uid"] = v
		}
	}
	return out
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, keep, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	result := conf.PrevResult
	if result == nil {
		result = &current.Result{CNIVersion: current.ImplementedSpecVersion}
	}
	ann := conf.RuntimeConfig.PodAnnotations
	if !annotations.Present(ann) {
		return types.PrintResult(result, conf.CNIVersion)
	}
	settings, name, err := annotations.Parse(ann)
	if err == nil {
		_, err = api.ResolveContainer(settings, name)
	}
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "childflow: pod "+args.ContainerID+": "+err.Error(), "")
	}
	if err := api.CheckID(args.ContainerID); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, err.Error(), "")
	}
	node := conf.node()
	att, err := node.Attach(attach.Sandbox{
		ID: args.ContainerID, Netns: args.Netns, Settings: settings, Source: Source,
		Keep: keep, Labels: podLabels(args.Args),
	})
	if err == nil && att.Shared {
		err = guardHostSide(conf, args, keep)
		if err != nil {
			node.Detach(args.ContainerID)
		}
	}
	if err != nil {
		return types.NewError(types.ErrInternal, "childflow: pod "+args.ContainerID+": "+err.Error(), "")
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// guardHostSide filters the pod's veth on the host: the pod's own rules
// cannot stop a process with CAP_NET_RAW from writing frames to it.
func guardHostSide(conf *NetConf, args *skel.CmdArgs, keep []netip.Prefix) error {
	g, err := tunns.HostGuardOf(args.Netns, args.IfName, args.ContainerID, keep)
	if err != nil {
		return err
	}
	return conf.guards().Install(g)
}

// cmdDel detaches. It succeeds when the netns, the link or the daemon is
// gone: a daemon that is down finds a tombstone when it comes back.
func cmdDel(args *skel.CmdArgs) error {
	conf, _, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if api.CheckID(args.ContainerID) != nil {
		return nil
	}
	if err := conf.guards().Remove(args.ContainerID); err != nil {
		return types.NewError(types.ErrInternal, "childflow: pod "+args.ContainerID+": "+err.Error(), "")
	}
	err = api.Client{Socket: conf.Socket}.Detach(args.ContainerID)
	if errors.Is(err, api.ErrUnavailable) {
		if args.Netns != "" {
			tunns.DeleteIn(args.Netns, "cf0")
		}
		return tombstone(conf, args.ContainerID)
	}
	return err
}

// tombstone records a detach for a daemon that is down.
func tombstone(conf *NetConf, id string) error {
	dir := filepath.Join(conf.StateDir, api.TombstoneDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, id), nil, 0o600)
}

// cmdCheck reports a missing link, route or attachment of an annotated pod.
func cmdCheck(args *skel.CmdArgs) error {
	conf, _, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if !annotations.Present(conf.RuntimeConfig.PodAnnotations) {
		return nil
	}
	if err := tunns.CheckIn(args.Netns, "cf0"); err != nil {
		return types.NewError(types.ErrInternal, "childflow: pod "+args.ContainerID+": "+err.Error(), "")
	}
	// A flushed ruleset (a restart of nftables.service) takes the guard too.
	if _, err := tunns.HostPeerOf(args.Netns, args.IfName); err == nil {
		if ok, err := conf.guards().Has(args.ContainerID); err != nil || !ok {
			return types.NewError(types.ErrInternal, fmt.Sprintf("childflow: pod %s: the guard of its veth on the host (in nftables table %s) is gone", args.ContainerID, steer.GuardTable), "")
		}
	}
	st, err := api.Client{Socket: conf.Socket}.Status(args.ContainerID)
	if err != nil {
		return types.NewError(types.ErrInternal, "childflow: pod "+args.ContainerID+": daemon: "+err.Error(), "")
	}
	if ino, err := tunns.NetnsInode(args.Netns); err != nil || ino != st.NetnsInode {
		return types.NewError(types.ErrInternal, fmt.Sprintf("childflow: pod %s: the daemon relays another network namespace", args.ContainerID), "")
	}
	return nil
}

// cmdGC detaches this plugin's sandboxes that are not in the valid list.
func cmdGC(args *skel.CmdArgs) error {
	conf, _, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	client := api.Client{Socket: conf.Socket}
	list, err := client.List()
	if errors.Is(err, api.ErrUnavailable) {
		return nil // it reaps dead namespaces itself when it is back
	}
	if err != nil {
		return types.NewError(types.ErrInternal, "childflow: gc: "+err.Error(), "")
	}
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[a.ContainerID] = true
	}
	var errs []error
	for _, s := range list {
		if s.Source == Source && !valid[s.ID] {
			errs = append(errs, client.Detach(s.ID))
		}
	}
	// The node's guards are not all this plugin's: the OCI hook guards
	// its containers' veths too, and those stay while their sandboxes do
	// (the daemon removes a gone sandbox's guard).
	held := func(key string) bool {
		return slices.ContainsFunc(conf.ValidAttachments, func(a types.GCAttachment) bool { return steer.Matches(key, a.ContainerID) }) ||
			slices.ContainsFunc(list, func(s api.Status) bool { return s.Source != Source && steer.Matches(key, s.ID) })
	}
	if keys, err := conf.guards().List(); err == nil {
		for _, k := range keys {
			if !held(k) {
				errs = append(errs, conf.guards().Remove(k))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return types.NewError(types.ErrInternal, "childflow: gc: "+err.Error(), "")
	}
	return nil
}

// cmdStatus is ready when the daemon answers.
func cmdStatus(args *skel.CmdArgs) error {
	conf, _, err := parseConf(args.StdinData)
	if err != nil {
		return err
	}
	if _, err := (api.Client{Socket: conf.Socket}).List(); err != nil {
		return types.NewError(errPluginNotAvailable, "childflow daemon not reachable at "+conf.Socket, err.Error())
	}
	return nil
}
