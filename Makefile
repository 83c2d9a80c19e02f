SHELL := /bin/bash
GO      ?= go
BIN     := bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/childflow/childflow/internal/version.Version=$(VERSION)
# Static, cgo-free: nothing here needs cgo, and a static binary runs
# wherever it is copied (make e2e-race alone builds with cgo, which the
# race detector needs).
export CGO_ENABLED = 0

.PHONY: all build install manifests test unit race e2e e2e-race e2e-vm fuzz bench lint clean

all: build

CMDS    := childflow childflow-init childflow-hook childflow-runtime childflow-cni

build:
	for c in $(CMDS); do $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/$$c ./cmd/$$c || exit 1; done

PREFIX ?= /usr/local

# Binaries, the systemd unit and the podman/CRI-O hooks.d entries.
install: build
	install -D -m 0755 -t $(DESTDIR)$(PREFIX)/bin $(addprefix $(BIN)/,$(CMDS))
	install -D -m 0644 deploy/systemd/childflow.service $(DESTDIR)/etc/systemd/system/childflow.service
	install -D -m 0644 -t $(DESTDIR)/usr/share/containers/oci/hooks.d deploy/hooks.d/*.json

# Plain manifests for clusters without helm, rendered from the chart.
manifests:
	helm template childflow charts/childflow --namespace kube-system > deploy/kubernetes/childflow.yaml

# The whole suite: unit tests, then the end-to-end tests (root: in CI they
# run; as a normal user they skip), then what the whole run left on the
# host (the e2e tests check childflow's own state after each test).
test:
	mkdir -p $(BIN) && hack/leftovers.sh record $(BIN)/host-state
	$(MAKE) unit race e2e
	hack/leftovers.sh check $(BIN)/host-state

unit:
	$(GO) test -count=1 ./...

# The unit tests again under the race detector, which needs cgo (gcc).
race:
	CGO_ENABLED=1 $(GO) test -race -count=1 ./...

# The log keeps all; the terminal shows the tests, their results and their
# messages (a message's further lines are indented).
e2e: build
	$(GO) test -count=1 -tags e2e -timeout 20m -v ./test/e2e/ 2>&1 | tee e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|        )|_test.go' ; test $${PIPESTATUS[0]} -eq 0

# By hand (~16 min here, not part of test): the end-to-end tests against
# binaries built with the race detector. Its reports go to RACELOG, and
# any fails the run. The two memory-budget tests are left out: the
# detector's shadow memory multiplies childflow's. RUN='TestX|TestY' runs
# only those.
RACELOG ?= /tmp/childflow-e2e-race
e2e-race:
	rm -rf $(RACELOG) && mkdir -p -m 1777 $(RACELOG)
	CHILDFLOW_E2E_RACE=1 GORACE="exitcode=0 log_path=$(RACELOG)/race" $(GO) test -count=1 -tags e2e -timeout 40m $(if $(RUN),-run '$(RUN)') \
		-skip 'TestStuckFlowsStayWithinTheBufferBudget|TestPingFloodStaysBounded' ./test/e2e/; \
	status=$$?; if ls $(RACELOG)/race.* >/dev/null 2>&1; then cat $(RACELOG)/race.*; exit 1; fi; rm -rf $(RACELOG); exit $$status

# By hand (~20 min under emulation, not part of test): the end-to-end
# tests on the distribution's packaged kernel (hack/kernel-vm.sh), booted
# with KERNEL_ARGS (ipv6.disable=1, say); RUN='TestX|TestY' runs only
# those, CHILDFLOW_VM_CACHE picks another fetched kernel, CHILDFLOW_VM_CPUS
# gives the VM more than one vCPU. The first --root run of a boot loads
# netfilter's modules (~14 s): done before the tests, one of which waits
# 10 s for a sandbox. The kernel tests boot VMs of their own; without IPv6
# in the kernel the tests run their IPv4 halves, and those that are IPv6's
# alone are left out here. So is the podman pod's: on the VM's cgroup v2
# without systemd, podman 4.3.1 with cgroupfs cannot start a pod's infra
# container.
KERNEL_ARGS ?=
VM_SKIP := TestRootForwardsIPv6OnKernelsBefore617|TestAKernelWithoutIPv6|TestADeviceMovedIntoASandboxIsKeptDown|TestPodmanPodsShareASandbox$(if $(findstring ipv6.disable=1,$(KERNEL_ARGS)),|TestAnycastIsTheHosts|TestRootStartsWhereTheHostTurnedIPv6Off)
e2e-vm: build
	$(GO) test -c -tags e2e -o $(BIN)/e2e.test ./test/e2e/
	script=$$(mktemp) && trap 'rm -f $$script' EXIT && \
	printf '%s\n' 'cd test/e2e && ../../$(BIN)/childflow --root -- true' \
		'exec ../../$(BIN)/e2e.test -test.v -test.timeout 90m -test.run "$(RUN)" -test.skip "$(VM_SKIP)"' >$$script && \
	CHILDFLOW_VM_TIMEOUT=$${CHILDFLOW_VM_TIMEOUT:-5700} hack/kernel-vm.sh $(if $(KERNEL_ARGS),-a '$(KERNEL_ARGS)') run $$script \
		| tee e2e-vm.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic|        )|_test.go'; test $${PIPESTATUS[0]} -eq 0

# Fuzzing, by hand (the seeds and what it found run in unit): each
# target for FUZZTIME, the engine's in a network namespace of its own,
# so that nothing a fuzzed packet makes can leave this host.
FUZZTIME ?= 10m
fuzz:
	unshare --net --map-root-user sh -c 'ip link set lo up && $(GO) test -run "^$$" -fuzz FuzzSandboxPackets -fuzztime $(FUZZTIME) ./engine/'
	$(GO) test -run '^$$' -fuzz FuzzAnnotations -fuzztime $(FUZZTIME) ./policy/annotations/

bench: build
	hack/bench.sh
	hack/bench-containers.sh
	hack/bench-scale.sh

lint:
	gofmt -l . | (! grep .)
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/e2e/

clean:
	rm -rf $(BIN) e2e.log e2e-vm.log
