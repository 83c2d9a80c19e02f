package cni

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestInstallChainsOnceAndUninstallRemoves(t *testing.T) {
	dir := t.TempDir()
	bin, conf := filepath.Join(dir, "bin"), filepath.Join(dir, "net.d")
	os.MkdirAll(conf, 0o755)
	src := filepath.Join(dir, "childflow-cni")
	os.WriteFile(src, []byte("#!/bin/true\n"), 0o755)
	os.WriteFile(filepath.Join(conf, "10-calico.conflist"), []byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"}]}`), 0o644)
	os.WriteFile(filepath.Join(conf, "99-other.conflist"), []byte(`{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`), 0o644)
	for i := 0; i < 2; i++ {
		path, err := Install(src, bin, conf, map[string]any{"clusterCIDRs": []string{"10.244.0.0/16"}})
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(path) != "10-calico.conflist" {
			t.Fatalf("chained into %s", path)
		}
	}
	var got struct {
		Plugins []map[string]any `json:"plugins"`
	}
	b, _ := os.ReadFile(filepath.Join(conf, "10-calico.conflist"))
	json.Unmarshal(b, &got)
	if len(got.Plugins) != 3 || got.Plugins[0]["type"] != "calico" || got.Plugins[2]["type"] != PluginType || got.Plugins[2]["capabilities"] == nil {
		t.Fatalf("conflist after two installs: %s", b)
	}
	if st, err := os.Stat(filepath.Join(bin, PluginType)); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("binary: %v", err)
	}
	if err := Uninstall(bin, conf); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(filepath.Join(conf, "10-calico.conflist"))
	json.Unmarshal(b, &got)
	if len(got.Plugins) != 2 {
		t.Fatalf("after uninstall: %s", b)
	}
	if _, err := os.Stat(filepath.Join(bin, PluginType)); !os.IsNotExist(err) {
		t.Error("binary left")
	}
}

func TestInstallNeedsANetwork(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "p")
	os.WriteFile(src, nil, 0o755)
	if _, err := Install(src, dir, dir, nil); err == nil {
		t.Fatal("installed into an empty config directory")
	}
}
