"""Several "hosts" on one machine for multi-host tests: Linux network namespaces joined by a switch.

Each host is a network namespace with one interface, ``eth0``, plugged into a bridge; the bridge lives in
a namespace of its own (the switch), so the machine's firewall never sees the traffic between hosts, and
the root namespace (the test) is plugged into it too. Addresses come from a private /24,
10.231.N.0/24, with N chosen so that it overlaps no route or address of the root namespace. Processes run
in a host through ``ip netns exec`` and ``unshare --uts`` with a hostname of the host's own, so that they
see what processes on different machines see: other addresses, and another machine identity (hostname);
the boot id and /dev/shm stay the machine's, which only a test on one machine has in common.

Names: ``NetnsLab.set_names`` gives every host the same /etc/hosts (``ip netns exec`` bind-mounts
/etc/netns/NAME/hosts over /etc/hosts for what it runs), rewritten in place, so a name can be moved to
another host while the processes that resolve it keep running (a replaced pod's DNS name).

Every name carries the test process's pid, and everything is removed at the end, on failure too; a
switch or host left by a killed run (its pid gone) is removed by the next lab, with the processes in it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_PREFIX = "smnet"
_IFNAME = "eth0"  # each host's one interface (GLOO_SOCKET_IFNAME, UCX_NET_DEVICES)
_ETC_NETNS = Path("/etc/netns")  # per-namespace /etc files that `ip netns exec` mounts


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab (None when it can): it needs root, ``ip`` and ``unshare``, and
    the kernel must let it create a network namespace with a veth pair."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); this test runs as a user"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command on this machine (iproute2 / util-linux)"
    probe = f"{_PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: `ip netns add` failed: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair in a network namespace: {veth.stderr.strip()}"
        uts = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"], capture_output=True,
                             text=True, timeout=30)
        if uts.returncode != 0:
            return f"cannot give a process in a namespace a hostname of its own: {uts.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not reaped yet, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sweep_stale() -> None:
    """Remove the namespaces and root-side links of labs whose test process is gone (a killed run), and end
    the processes that run still had in them."""
    names = _ip("netns", "list", check=False).stdout.split()
    for name in names:
        m = re.fullmatch(rf"{_PREFIX}-(\d+)-\w+", name)
        if m and not _pid_alive(int(m.group(1))):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "del", name, check=False)
            shutil.rmtree(_ETC_NETNS / name, ignore_errors=True)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.search(rf"\d+: ({_PREFIX[:2]}v(\d+)r)[@:]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def free_subnet(start: int) -> ipaddress.IPv4Network:
    """A 10.231.N.0/24 that overlaps no route or address here, trying N from ``start`` on."""
    taken: list[ipaddress.IPv4Network] = []
    out = _ip("-4", "-o", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr", "show").stdout
    for word in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
        taken.append(ipaddress.ip_network(word, strict=False))
    for i in range(256):
        net = ipaddress.ip_network(f"10.231.{(start + i) % 256}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 in 10.231.0.0/16 on this machine")


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace on the lab's switch. Invariant: while the lab is open, ``address`` is reachable from
    every other host and from the root namespace, unless ``set_link(False)`` cut it off."""

    netns: str
    hostname: str
    address: str
    switch: str   # the switch namespace
    port: str     # this host's port on the switch (in the switch namespace)
    ifname: str = _IFNAME

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run in this host, with its hostname (exec all the way down: one pid)."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *argv]

    def set_link(self, up: bool) -> None:
        """Plug this host's cable back in (``up``) or pull it at the switch: nothing reaches it, no reset."""
        _ip("-n", self.switch, "link", "set", self.port, "up" if up else "down")


@dataclass
class NetnsLab:
    """``count`` hosts and the root namespace on one switch (module docstring). Use as a context manager;
    on exit every process started with ``spawn`` is killed by process group and every namespace and link is
    removed. Invariant: ``procs`` holds each process spawned and not yet reaped."""

    count: int
    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: list[Host] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    root_address: str = ""

    @property
    def switch(self) -> str:
        return f"{_PREFIX}-{self.tag}-sw"

    @property
    def root_link(self) -> str:
        return f"{_PREFIX[:2]}v{self.tag}r"

    def __enter__(self) -> NetnsLab:
        sweep_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        net = free_subnet(int(self.tag) % 256)
        addr = [str(a) for a in net.hosts()]
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        # the root namespace's cable: the test reaches the hosts through it
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", sw)
        self._plug(sw, "root")
        _ip("addr", "add", f"{addr[0]}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        self.root_address = addr[0]
        for i in range(self.count):
            letter = "abcdefgh"[i]
            host = Host(netns=f"{_PREFIX}-{self.tag}-{letter}", hostname=f"{_PREFIX}-{self.tag}-{letter}",
                        address=addr[10 + i], switch=sw, port=f"host-{letter}")
            _ip("netns", "add", host.netns)
            self.hosts.append(host)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", host.port, "type", "veth", "peer", "name", host.ifname,
                "netns", host.netns)
            self._plug(sw, host.port)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.ifname)
            _ip("-n", host.netns, "link", "set", host.ifname, "up")

    @staticmethod
    def _plug(switch: str, port: str) -> None:
        _ip("-n", switch, "link", "set", port, "master", "br0")
        _ip("-n", switch, "link", "set", port, "up")

    def set_names(self, names: dict[str, Host]) -> None:
        """Every host resolves each name to its host's address (its /etc/hosts, rewritten in place: the
        bind mount of a process already running follows the file, and glibc reads it on every lookup)."""
        text = "127.0.0.1 localhost\n" + "".join(f"{h.address} {name}\n" for name, h in names.items())
        for host in self.hosts:
            path = _ETC_NETNS / host.netns / "hosts"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:   # truncate + write: the same inode
                f.write(text)

    def spawn(self, host: Host, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``argv`` in ``host``, in a session of its own (its process group is killed at close), output
        into ``log``."""
        with open(log, "wb") as out:
            p = subprocess.Popen(host.command(argv), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, **(env or {})})
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen, timeout_s: float = 10.0) -> None:
        """SIGTERM ``p``'s process group, SIGKILL what is left after ``timeout_s``."""
        _signal_group(p, signal.SIGTERM)
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # the group's stragglers too (TP workers)
        p.wait(timeout=10)
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in list(self.procs):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in list(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill(p, timeout_s=0)
        # a namespace with processes in it outlives `ip netns del`: they are all gone by now
        for host in self.hosts:
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(_ETC_NETNS / host.netns, ignore_errors=True)
        try:
            _ETC_NETNS.rmdir()   # only if no other lab (or the machine's own setup) uses it
        except OSError:
            pass
        _ip("netns", "del", self.switch, check=False)
        _ip("link", "del", self.root_link, check=False)  # gone with its peer already, normally
        self.hosts.clear()


def tcp_connections(pid: int) -> set[tuple[str, int, str, int]]:
    """The established TCP connections in the network namespace of process ``pid``, as (local address, local
    port, remote address, remote port); IPv4 peers of dual-stack sockets (gRPC's) as plain IPv4 addresses."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01":  # TCP_ESTABLISHED
                found.add((*_endpoint(fields[1]), *_endpoint(fields[2])))
    return found


def _endpoint(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` of /proc/net/tcp{,6}: the address as 32-bit words in the kernel's byte order."""
    address, port = text.split(":")
    raw = b"".join(struct.pack("=I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
    ip = ipaddress.ip_address(raw)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip), int(port, 16)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
