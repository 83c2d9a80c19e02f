#!/usr/bin/env bash
# Throwaway test hosts for childflow's end-to-end tests and benchmarks.
#
#   hack/testnet.sh up [NAME]    create netns NAME-inet on a veth, start servers
#   hack/testnet.sh down [NAME]  stop the servers, delete the netns and links
#
# The "internet" netns answers on TEST-NET addresses only:
#   203.0.113.10, 2001:db8::10   HTTP (busybox httpd :80), TCP echo :7, UDP echo :7,
#                                TCP "banner" server :25 (the server speaks first)
#   203.0.113.20, 2001:db8::20   same servers (a second, "denied" host)
#   203.0.113.53, 2001:db8::53   dnsmasq with the names below (and every
#                                name under wild.test: 203.0.113.10)
#   203.0.113.54, 2001:db8::54   unbound, forwarding to dnsmasq; it answers
#                                unbound.test (203.0.113.10) itself, and
#                                rebind.test, which dnsmasq says is .20, .10:
#                                a name that changed its address between two
#                                resolvers' questions
#   203.0.113.30, 2001:db8::30   proxies: squid :3128 (open) and :3129 (Basic auth
#                                alice:s3cret), microsocks :1080 (open) and :1081
#                                (alice:s3cret) (and open on [2001:db8::30]:1080), dante :1082 (open),
#                                tinyproxy :8888, and stunnel in front
#                                of squid :3128 as HTTPS proxies: :3443 with a
#                                certificate for 203.0.113.30, :3444 with one for
#                                elsewhere.test, both from the test CA in
#                                $state/tls/ca.pem. They resolve through dnsmasq.
# The host side of the veth is 203.0.113.1 / 2001:db8::1. Nothing here
# routes anywhere else.
set -euo pipefail

cmd=${1:-}
name=${2:-cftest}
ns="$name-inet"
host_if="${name:0:8}-h"
ns_if="${name:0:8}-n"
state="/run/childflow-testnet/$name"
hack=$(cd "$(dirname "$0")" && pwd)
# A kernel booted with ipv6.disable=1 has no IPv6 at all: the test hosts
# then answer on their IPv4 addresses only.
have_ipv6() { [ -d /proc/sys/net/ipv6 ]; }
# squid names its shared memory (/dev/shm) after its service: ours, so
# that down removes exactly what this squid left there when killed.
squid_service="cftestnet${name//[^a-zA-Z0-9]/}"

die() { echo "testnet: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

start() { # start NAME CMD...: run CMD in the netns, detached, pid recorded
	local what=$1; shift
	ip netns exec "$ns" setsid "$@" </dev/null >"$state/$what.log" 2>&1 &
	echo $! >"$state/$what.pid"
}

up() {
	down_quiet
	# Two testnets answer on the same addresses: the first would get the
	# second's traffic.
	if other=$(ip -o route show 203.0.113.0/26 | awk '{print $3}') && [ -n "$other" ]; then
		die "another testnet is up on $other (hack/testnet.sh down ${other%-h})"
	fi
	mkdir -p "$state/www"
	ip netns add "$ns"
	ip link add "$host_if" type veth peer name "$ns_if"
	ip link set "$ns_if" netns "$ns"
	# A /26, not the whole /24: this environment's package registry lives at
	# 203.0.113.80 and must stay reachable while the testnet is up.
	ip addr add 203.0.113.1/26 dev "$host_if"
	! have_ipv6 || ip -6 addr add 2001:db8::1/64 dev "$host_if" nodad
	ip link set "$host_if" up
	ip netns exec "$ns" ip link set lo up
	for a in 10 20 30 53 54; do
		ip netns exec "$ns" ip addr add "203.0.113.$a/26" dev "$ns_if"
		! have_ipv6 || ip netns exec "$ns" ip -6 addr add "2001:db8::$a/64" dev "$ns_if" nodad
	done
	ip netns exec "$ns" ip link set "$ns_if" up
	ip netns exec "$ns" ip route add default via 203.0.113.1
	! have_ipv6 || ip netns exec "$ns" ip -6 route add default via 2001:db8::1
	local tcp_listen=TCP6-LISTEN dual_stack=,ipv6only=0 udp_addrs="203.0.113.10 2001:db8::10 203.0.113.20 2001:db8::20"
	local dns_listen="--listen-address=203.0.113.53 --listen-address=2001:db8::53"
	if ! have_ipv6; then
		tcp_listen=TCP4-LISTEN dual_stack= udp_addrs="203.0.113.10 203.0.113.20"
		dns_listen="--listen-address=203.0.113.53"
	fi
	# Unprivileged ping sockets inside the test host are not needed: the
	# kernel answers echo requests itself.

	echo "hello from the test internet" >"$state/www/index.html"
	head -c 10485760 /dev/zero >"$state/www/10m.bin"
	start httpd busybox httpd -f -p 80 -h "$state/www"
	start tcpecho socat "$tcp_listen:7,fork,reuseaddr$dual_stack" EXEC:cat
	# shellcheck disable=SC2086 # the lists split on purpose
	start udpecho python3 "$hack/udpecho.py" 7 $udp_addrs
	start banner socat "$tcp_listen:25,fork,reuseaddr$dual_stack" SYSTEM:'echo 220 banner.test ESMTP ready; cat'
	# shellcheck disable=SC2086 # the lists split on purpose
	start dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
		$dns_listen --log-queries --log-facility=- \
		--host-record=web.test,203.0.113.10,2001:db8::10 \
		--host-record=allowed.test,203.0.113.10,2001:db8::10 \
		--host-record=sub.allowed.test,203.0.113.10 \
		--host-record=badallowed.test,203.0.113.20 \
		--host-record=denied.test,203.0.113.20,2001:db8::20 \
		--host-record=shared.test,203.0.113.10 \
		--host-record=loopback.test,127.0.0.1 \
		--host-record=rebind.test,203.0.113.20,2001:db8::20 \
		--address=/wild.test/203.0.113.10 \
		--cname=alias.test,allowed.test \
		--cname=tracker.test,denied.test \
		--txt-record=txt.test,"hello"
	start_proxies
	start_unbound
	# Wait until every server listens.
	for _ in $(seq 100); do
		if ip netns exec "$ns" ss -Hltn 'sport = :80' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :7' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :25' | grep -q . &&
			[ "$(ip netns exec "$ns" ss -Hlun 'sport = :7' | wc -l)" = "$(echo $udp_addrs | wc -w)" ] &&
			ip netns exec "$ns" ss -Hlun 'src 203.0.113.53 and sport = :53' | grep -q . &&
			ip netns exec "$ns" ss -Hlun 'src 203.0.113.54 and sport = :53' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :1082' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :3129' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :1081' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :8888' | grep -q . &&
			ip netns exec "$ns" ss -Hltn 'sport = :3444' | grep -q .; then
			echo "testnet $name up: netns $ns, hosts 203.0.113.10 203.0.113.20, dns 203.0.113.53 (dnsmasq) and .54 (unbound)"
			return 0
		fi
		sleep 0.05
	done
	cat "$state"/*.log >&2 || true
	die "servers did not come up"
}

start_proxies() {
	# ip netns exec binds /etc/netns/NS/resolv.conf over /etc/resolv.conf.
	mkdir -p "/etc/netns/$ns" "$state/squid"
	echo "nameserver 203.0.113.53" >"/etc/netns/$ns/resolv.conf"
	chmod 777 "$state/squid"
	htpasswd -b -c "$state/squid/passwd" alice s3cret 2>/dev/null
	chmod 644 "$state/squid/passwd"
	cat >"$state/squid/squid.conf" <<CONF
http_port 203.0.113.30:3128 name=open
http_port 203.0.113.30:3129 name=auth
pid_filename $state/squid/squid.pid
access_log stdio:$state/squid/access.log
cache_log $state/squid/cache.log
cache deny all
coredump_dir $state/squid
shutdown_lifetime 0 seconds
dns_nameservers 203.0.113.53
auth_param basic program /usr/lib/squid/basic_ncsa_auth $state/squid/passwd
acl authport myportname auth
acl authed proxy_auth REQUIRED
http_access allow authport authed
http_access deny authport
http_access allow all
CONF
	start squid squid -n "$squid_service" -N -f "$state/squid/squid.conf"
	mkdir -p "$state/tinyproxy" && chmod 777 "$state/tinyproxy"
	cat >"$state/tinyproxy/tinyproxy.conf" <<CONF
User nobody
Group nogroup
Port 8888
Listen 203.0.113.30
Timeout 60
LogFile "$state/tinyproxy/tinyproxy.log"
LogLevel Connect
CONF
	start tinyproxy tinyproxy -d -c "$state/tinyproxy/tinyproxy.conf"
	make_certs
	cat >"$state/tls/stunnel.conf" <<CONF
foreground = yes
pid =
[good]
accept = 203.0.113.30:3443
connect = 203.0.113.30:3128
cert = $state/tls/good.pem
key = $state/tls/good.key
[wrong-name]
accept = 203.0.113.30:3444
connect = 203.0.113.30:3128
cert = $state/tls/wrong.pem
key = $state/tls/wrong.key
CONF
	start stunnel stunnel "$state/tls/stunnel.conf"
	start microsocks microsocks -i 203.0.113.30 -p 1080
	start microsocks-auth microsocks -i 203.0.113.30 -p 1081 -u alice -P s3cret
	! have_ipv6 || start microsocks6 microsocks -i 2001:db8::30 -p 1080
	mkdir -p "$state/dante"
	cat >"$state/dante/danted.conf" <<CONF
logoutput: stderr
internal: 203.0.113.30 port = 1082
external: 203.0.113.30
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }
socks pass { from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect }
CONF
	start dante danted -f "$state/dante/danted.conf" -p "$state/dante/danted.pid"
}

# start_unbound: a second resolver, unbound, forwarding to dnsmasq and
# answering unbound.test itself (so a test can tell who answered).
start_unbound() {
	mkdir -p "$state/unbound"
	local v6=("interface: 2001:db8::54" "do-ip6: yes")
	have_ipv6 || v6=("" "do-ip6: no")
	cat >"$state/unbound/unbound.conf" <<CONF
server:
	interface: 203.0.113.54
	${v6[0]}
	${v6[1]}
	access-control: 0.0.0.0/0 allow
	access-control: ::/0 allow
	do-daemonize: no
	username: ""
	chroot: ""
	directory: "$state/unbound"
	pidfile: ""
	use-syslog: no
	logfile: ""
	module-config: "iterator"
	do-not-query-localhost: no
	# test. is one of unbound's default blocked zones (RFC 6761).
	local-zone: "test." nodefault
	local-zone: "unbound.test." static
	local-data: "unbound.test. 60 IN A 203.0.113.10"
	local-zone: "rebind.test." static
	local-data: "rebind.test. 60 IN A 203.0.113.10"
	local-data: "rebind.test. 60 IN AAAA 2001:db8::10"
forward-zone:
	name: "."
	forward-addr: 203.0.113.53
CONF
	start unbound unbound -d -c "$state/unbound/unbound.conf"
}

# make_certs: a throwaway CA and two server certificates for the HTTPS proxies.
make_certs() {
	local d="$state/tls"
	mkdir -p "$d"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
		-subj /CN=childflow-test-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
	for c in good:IP:203.0.113.30 wrong:DNS:elsewhere.test; do
		local name=${c%%:*} san=${c#*:}
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
			-keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
		printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" >"$d/$name.ext"
		openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 2 \
			-extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null
	done
	chmod 644 "$d"/*
}

down_quiet() {
	if [ -d "$state" ]; then
		for p in "$state"/*.pid; do
			[ -f "$p" ] || continue
			pid=$(cat "$p")
			pkill -KILL -s "$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
		done
		rm -rf "$state"
	fi
	rm -f "/dev/shm/$squid_service-"*
	ip link del "$host_if" 2>/dev/null || true
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "/etc/netns/$ns"
	# The parents too, when this script made them and nothing else uses them.
	rmdir /etc/netns /run/childflow-testnet 2>/dev/null || true
}

case "$cmd" in
up) up ;;
down) down_quiet ;;
*) die "usage: $0 up|down [NAME]" ;;
esac
