package cni

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// PluginType is the type name of this plugin in a conflist.
const PluginType = "childflow-cni"

// Install copies the plugin binary into binDir and appends entry (the
// plugin's configuration; "type" is set) to the node's network
// configuration: the first conflist in confDir, which is the one
// containerd and CRI-O use. It does both atomically and only once.
func Install(binary, binDir, confDir string, entry map[string]any) (conflist string, err error) {
	if err := copyAtomic(binary, filepath.Join(binDir, PluginType), 0o755); err != nil {
		return "", err
	}
	path, conf, err := primaryConf(confDir)
	if err != nil {
		return "", err
	}
	plugins, _ := conf["plugins"].([]any)
	out := make([]any, 0, len(plugins)+1)
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue // replaced by entry: settings may have changed
		}
		out = append(out, p)
	}
	e := map[string]any{}
	for k, v := range entry {
		e[k] = v
	}
	e["type"] = PluginType
	if _, ok := e["capabilities"]; !ok {
		e["capabilities"] = map[string]bool{"io.kubernetes.cri.pod-annotations": true}
	}
	conf["plugins"] = append(out, e)
	return path, writeJSON(path, conf)
}

// Uninstall removes the plugin from every conflist in confDir and its
// binary from binDir.
func Uninstall(binDir, confDir string) error {
	entries, _ := os.ReadDir(confDir)
	for _, de := range entries {
		if !strings.HasSuffix(de.Name(), ".conflist") {
			continue
		}
		path := filepath.Join(confDir, de.Name())
		var conf map[string]any
		b, err := os.ReadFile(path)
		if err != nil || json.Unmarshal(b, &conf) != nil {
			continue
		}
		plugins, _ := conf["plugins"].([]any)
		var out []any
		for _, p := range plugins {
			if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
				continue
			}
			out = append(out, p)
		}
		if len(out) != len(plugins) {
			conf["plugins"] = out
			if err := writeJSON(path, conf); err != nil {
				return err
			}
		}
	}
	if err := os.Remove(filepath.Join(binDir, PluginType)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// primaryConf reads the lexically first .conflist or .conf of confDir; a
// single-plugin .conf is turned into a conflist in place of itself.
func primaryConf(confDir string) (string, map[string]any, error) {
	entries, err := os.ReadDir(confDir)
	if err != nil {
		return "", nil, fmt.Errorf("reading CNI config directory: %w", err)
	}
	var names []string
	for _, de := range entries {
		if n := de.Name(); strings.HasSuffix(n, ".conflist") || strings.HasSuffix(n, ".conf") || strings.HasSuffix(n, ".json") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "", nil, fmt.Errorf("no CNI network configuration in %s to chain childflow-cni into (is the cluster network installed?)", confDir)
	}
	path := filepath.Join(confDir, names[0])
	b, err := os.ReadFile(path)
	if err != nil {
		return "", nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(b, &conf); err != nil {
		return "", nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	if _, ok := conf["plugins"]; ok {
		return path, conf, nil
	}
	// A .conf: one plugin. Make it the first of a list.
	list := map[string]any{"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": []any{conf}}
	newPath := strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	if err := os.Rename(path, path+".childflow-orig"); err != nil {
		return "", nil, err
	}
	return newPath, list, nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".childflow.tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func copyAtomic(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("opening the plugin binary: %w", err)
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tmp := dst + ".childflow.tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(tmp)
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
