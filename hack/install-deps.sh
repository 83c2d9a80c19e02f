#!/usr/bin/env bash
# Installs what childflow's build, tests and benchmarks need on Debian/Ubuntu.
# Idempotent; needs root (or sudo).
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
pkgs=(
	ca-certificates gcc libc6-dev iproute2 procps nftables iptables
	curl dnsutils iputils-ping traceroute socat netcat-openbsd busybox-static dnsmasq-base python3
	iperf3 slirp4netns passt hyperfine jq bc util-linux bsdutils bash perl-base e2fsprogs
	squid microsocks dante-server tinyproxy stunnel4 openssl apache2-utils tshark unbound
	runc crun containerd docker.io podman containernetworking-plugins
	chromium fonts-dejavu-core
	qemu-system-x86 kmod
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq
	$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
	echo "note: add /usr/local/go/bin to PATH" >&2
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "install Go 1.26 (https://go.dev/dl), or Go 1.21 or newer that can fetch it" >&2; exit 1; }
# go.mod asks for Go 1.26.8 (gVisor's minimum is 1.26.3). An older Go 1.21+
# fetches that toolchain itself unless GOTOOLCHAIN=local forbids it; asked
# once here, it says which before any build does.
(cd "$(dirname "$0")/.." && env "PATH=$PATH:/usr/local/go/bin" go version >/dev/null) || {
	echo "install Go 1.26 (https://go.dev/dl): go.mod asks for it" >&2
	exit 1
}
# The distribution's packaged kernel, which tests boot under QEMU for
# what this machine's kernel cannot show (hack/kernel-vm.sh).
$SUDO "$(dirname "$0")/kernel-vm.sh" fetch
# crictl (drives containerd's CRI in the Kubernetes tests) is no Debian
# package: build it from the Go module proxy.
if ! command -v crictl >/dev/null; then
	$SUDO env "PATH=$PATH:/usr/local/go/bin" GOBIN=/usr/local/bin CGO_ENABLED=0 \
		go install sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0
fi
# helm (lints and renders the chart in the tests): same.
if ! command -v helm >/dev/null; then
	$SUDO env "PATH=$PATH:/usr/local/go/bin" GOBIN=/usr/local/bin CGO_ENABLED=0 \
		go install helm.sh/helm/v3/cmd/helm@v3.22.0
fi
