"""Machines made of namespaces: the test bed (DESIGN.md, "The test bed").

A bed is N "machines" on this one, each a set of Linux namespaces:

- a **network namespace** with its own address on a private bridge (``10.213.X.0/24``;
  the host is ``.1``, node i is ``.(10 + i)``) and an on-link default route on its own
  veth, without a gateway, so Ray finds the node's own address while nothing can leave
  the machine (the build refuses unless the host's ``ip_forward`` and proxy ARP are off);
  IPv6 is off on every interface the bed made;
- a **mount namespace** with its own ``/root``, ``/tmp``, ``/run`` and ``/dev/shm``, and its
  own writable copy of a Python image: an overlayfs mounted where this test's virtual
  environment lives, whose lower layers are that environment and a layer of whiteouts
  that hides dvcray (so the image has Ray and DVC, not dvcray), over the base Python
  it was made from; this checkout and the bed's own folder are hidden;
- a **PID namespace** (Ray's start commands run ``ray stop``, which kills every Ray
  process it can see: without one, a worker's ``ray stop`` kills the head) and a UTS one
  (its own host name);
- Debian's **sshd** on port 22 as the only service, root logging in with the bed's key.

Everything is torn down by pid (each node's init, PID 1 of its namespace, is killed
with SIGKILL, which takes every process of the node with it) and by the names the bed
gave its namespaces and links; a session sweeps beds left by a run that died
(``sweep_stale``). Run as a script to try it by hand::

    python tests/testbed.py up 3      # prints the bed's folder; ssh -i FOLDER/id_bed root@10.213.X.10
    python tests/testbed.py down FOLDER
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BEDS = Path("/var/tmp/dvcray-testbeds")
PREFIX = "10.213"
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]

# PID 1 of a node: starts sshd, reaps every orphan (Ray daemonizes its processes), and
# exits with sshd. Run with -I -S: it needs nothing but the standard library.
INIT = r"""
import os, subprocess, sys, time
log = open(sys.argv[1], "ab", buffering=0)
sshd = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        time.sleep(0.5)
        continue
    if pid == sshd.pid:
        os._exit(1)
"""

SSHD_CONFIG = """\
ListenAddress {ip}
Port 22
HostKey /run/dvcray-bed/host_key
PidFile none
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AuthorizedKeysFile .ssh/authorized_keys
AcceptEnv none
PrintMotd no
MaxStartups 200
MaxSessions 200
Subsystem sftp internal-sftp
"""

# Runs as the first process of the node's namespaces, then becomes its init.
NODE_SCRIPT = r"""
set -eu
mount --make-rprivate /
hostname "$BED_HOSTNAME"
# The Python image: this environment's venv with dvcray whited out, writable per node.
mount -t overlay overlay -o "lowerdir=$BED_WHITEOUTS:$BED_VENV,upperdir=$BED_NODE/upper,workdir=$BED_NODE/work" "$BED_NODE/tmp/.image"
if [ -n "$BED_BASE" ]; then mount --bind "$BED_BASE" "$BED_NODE/tmp/.base"; fi
mount -t tmpfs -o mode=755,size=16m tmpfs /run
mkdir -p /run/sshd /run/dvcray-bed
cp "$BED_DIR/host_key" "$BED_NODE/sshd_config" /run/dvcray-bed/
chmod 600 /run/dvcray-bed/host_key
mount --rbind "$BED_NODE/root" /root
mount --rbind "$BED_NODE/tmp" /tmp
mount -t tmpfs -o size=2g tmpfs /dev/shm
for hide in $BED_HIDE; do
    if [ -d "$hide" ]; then mount -t tmpfs -o mode=755,size=1m tmpfs "$hide"; fi
done
mkdir -p "$BED_VENV"
mount --move /tmp/.image "$BED_VENV"
if [ -n "$BED_BASE" ]; then
    mkdir -p "$BED_BASE"
    mount --move /tmp/.base "$BED_BASE"
    mount -o remount,bind,ro "$BED_BASE"
fi
rmdir /tmp/.image /tmp/.base 2>/dev/null || true
exec "$BED_PYTHON" -I -S -c "$BED_INIT" /run/dvcray-bed/init.log /usr/sbin/sshd -D -e -f /run/dvcray-bed/sshd_config
"""


class BedUnavailable(Exception):
    """This machine cannot (or must not) hold a bed; the message says why."""


@dataclass
class Node:
    name: str                 # n0, n1, ...
    netns: str                # dvcray-<bed>-n0
    ip: str
    dir: str                  # host folder: root/, tmp/, upper/, work/
    hostname: str
    init_pid: int = 0         # host pid of PID 1 of its PID namespace
    pid_ns: str = ""          # "pid:[inode]" of that namespace
    instance: str = ""        # the cloud instance it stands for (tests/cloudbed.py), if any

    @property
    def root(self) -> Path:
        """The node's /root, seen from the host."""
        return Path(self.dir) / "root"

    @property
    def upper(self) -> Path:
        """The node's writes to the Python image, seen from the host."""
        return Path(self.dir) / "upper"


@dataclass
class Bed:
    id: str
    dir: str
    bridge: str
    subnet: str                # 10.213.X
    owner_pid: int
    venv: str
    nodes: list[Node] = field(default_factory=list)
    built_s: float = 0.0
    owner_start: int = -1      # the owner's start time (clock ticks after boot): a recycled pid is not it
    # Namespaces on the bridge that are not machines (a client's), and servers the bed
    # started (``[pid, start time in ticks]``): torn down with it, by name and by pid.
    extra_netns: list[str] = field(default_factory=list)
    servers: list[list[int]] = field(default_factory=list)

    # ------------------------------------------------------------------ addresses, keys

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def key(self) -> Path:
        """The private key every node accepts for root."""
        return Path(self.dir) / "id_bed"

    def node(self, name_or_ip: str) -> Node:
        return next(n for n in self.nodes if name_or_ip in (n.name, n.ip, n.hostname))

    def save(self) -> None:
        data = asdict(self)
        path = Path(self.dir) / "bed.json"
        # Atomic: a machine joins from a watcher thread while another session's sweep may read it.
        temp = path.with_name(f"bed.json.{os.getpid()}.{threading.get_ident()}")
        temp.write_text(json.dumps(data, indent=2))
        os.replace(temp, path)

    def owner_alive(self) -> bool:
        """The process that built the bed still runs (the same process: pid and start time)."""
        return _alive(self.owner_pid) and (self.owner_start < 0 or _start_ticks(self.owner_pid) == self.owner_start)

    @classmethod
    def load(cls, folder: Path) -> Bed:
        data = json.loads((Path(folder) / "bed.json").read_text())
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)

    # ------------------------------------------------------------------ using nodes

    def ssh(self, node: Node | str, command: str, timeout: float = 120,
            login: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` on a node over SSH as root (in a login shell, as Ray does)."""
        node = self.node(node) if isinstance(node, str) else node
        remote = f"bash --login -c {_quote(command)}" if login else command
        return subprocess.run(["ssh", *SSH_OPTIONS, "-i", str(self.key), f"root@{node.ip}", remote],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def pids(self, node: Node | str) -> list[int]:
        """Every live process of a node (those in its PID namespace), from the host."""
        node = self.node(node) if isinstance(node, str) else node
        if not node.pid_ns:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") == node.pid_ns and _state(int(entry.name)) != "Z":
                    found.append(int(entry.name))
            except OSError:
                continue
        return sorted(found)

    def processes(self, node: Node | str) -> list[str]:
        """``pid command line`` of every live process of a node."""
        out = []
        for pid in self.pids(node):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out.append(f"{pid} {cmd.strip()}")
        return out

    def ray_processes(self, node: Node | str) -> list[str]:
        """The Ray processes running on a node (GCS, raylet, dashboard, workers, ...)."""
        markers = ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/autoscaler", "default_worker.py",
                   "ray/_private/", "log_monitor.py", "monitor.py", "ray_client_server")
        return [p for p in self.processes(node) if any(m in p for m in markers)]

    def kill(self, node: Node | str) -> None:
        """The machine dies: SIGKILL to its init takes every process of the node with it."""
        node = self.node(node) if isinstance(node, str) else node
        if node.init_pid and _ns_of(node.init_pid) == node.pid_ns:
            try:
                os.kill(node.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while self.pids(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.pids(node)
        if left:
            raise RuntimeError(f"node {node.name} kept processes {left} after its init was killed")

    def start(self, node: Node | str, timeout: float = 60) -> None:
        """Boot a node (again): its namespaces, mounts and sshd. Its disk (/root, the
        image's writes) stays; /tmp, /run and /dev/shm start empty, as after a reboot."""
        node = self.node(node) if isinstance(node, str) else node
        nd = Path(node.dir)
        for sub in ("tmp",):
            shutil.rmtree(nd / sub, ignore_errors=True)
        (nd / "tmp").mkdir(mode=0o1777)
        os.chmod(nd / "tmp", 0o1777)
        for sub in (".image", ".base"):
            (nd / "tmp" / sub).mkdir()
        shutil.rmtree(nd / "work", ignore_errors=True)
        (nd / "work").mkdir()
        base = _hidden_base(self.venv)
        hide = [str(p) for p in _hidden_paths(Path(self.dir))]
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BED_HOSTNAME": node.hostname, "BED_NODE": str(nd),
            "BED_DIR": self.dir, "BED_VENV": self.venv, "BED_WHITEOUTS": str(Path(self.dir) / "whiteouts"),
            "BED_BASE": base or "", "BED_HIDE": " ".join(hide), "BED_INIT": INIT,
            "BED_PYTHON": os.path.realpath(sys.executable),
        }
        log = open(nd / "boot.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", node.netns, "unshare", "--mount", "--pid", "--uts",
                                 "--fork", "--mount-proc", "sh", "-c", NODE_SCRIPT],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        _pause_if_asked("node-started")
        node.init_pid = _child_of(proc.pid, timeout=10)
        node.pid_ns = _ns_of(node.init_pid)
        self.save()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"node {node.name} did not boot: {(nd / 'boot.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((node.ip, 22), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd of node {node.name} did not answer: "
                                       f"{(nd / 'boot.log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> list[str]:
        """Kill every node (by its init's pid), delete the namespaces, links and folders
        the bed made (by the names it gave them). Returns what it could not remove."""
        problems = []
        for node in self.nodes:
            try:
                self.kill(node)
            except RuntimeError as exc:
                problems.append(str(exc))
            # An init started but not yet recorded (the run was killed in between) lives
            # in the node's network namespace, which has the bed's name: kill by that.
            problems += kill_netns_processes(node.netns)
        for pid, started in self.servers:
            if _start_ticks(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for netns in self.extra_netns:
            problems += kill_netns_processes(netns)
        for netns in [n.netns for n in self.nodes] + self.extra_netns:
            _run(["ip", "netns", "del", netns], check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        _run(["ip", "link", "del", self.bridge], check=False)
        if not problems:
            shutil.rmtree(self.dir, ignore_errors=True)
        left = [n for n in [n.netns for n in self.nodes] + self.extra_netns if n in _netns_names()]
        if left:
            problems.append(f"network namespaces left: {left}")
        if _link_exists(self.bridge):
            problems.append(f"bridge left: {self.bridge}")
        return problems


# ---------------------------------------------------------------------- building


# What building a bed takes beyond uid 0: (bit in CapEff, name).
_CAPABILITIES = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN"), (27, "CAP_MKNOD")]


def check_host() -> None:
    """Refuse unless this machine can hold a bed and a bed cannot route off it.

    Raises:
        BedUnavailable: not root, a tool or overlayfs missing, or the host forwards
            packets (``ip_forward``) or answers ARP for others (proxy ARP).
    """
    if os.geteuid() != 0:
        raise BedUnavailable("the test bed needs root (network, mount and PID namespaces, a bridge)")
    uid_map = Path("/proc/self/uid_map").read_text().split()
    if uid_map[:3] != ["0", "0", "4294967295"]:
        raise BedUnavailable("root here is the root of a user namespace (an unprivileged container?): "
                             "it cannot make links on the host's network; run as real root, "
                             "or in a privileged container")
    effective = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("CapEff:")), 16)
    missing = [name for bit, name in _CAPABILITIES if not effective >> bit & 1]
    if missing:
        raise BedUnavailable(f"root here lacks {', '.join(missing)} (a container without them?): the bed "
                             "makes namespaces, mounts and links; run in a privileged container")
    for tool in ("ip", "unshare", "nsenter", "ssh", "ssh-keygen", "rsync", "mount"):
        if shutil.which(tool) is None:
            raise BedUnavailable(f"the test bed needs `{tool}` (Debian: iproute2, util-linux, openssh-client, rsync)")
    if not Path("/usr/sbin/sshd").exists():
        raise BedUnavailable("the test bed needs sshd (Debian: apt-get install openssh-server)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise BedUnavailable("the test bed needs overlayfs")
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
        raise BedUnavailable("refusing to build the test bed: this host forwards IPv4 packets "
                             "(net.ipv4.ip_forward=1), so nodes could reach other networks")
    for conf in Path("/proc/sys/net/ipv4/conf").iterdir():
        proxy = conf / "proxy_arp"
        if proxy.exists() and proxy.read_text().strip() != "0":
            raise BedUnavailable(f"refusing to build the test bed: proxy ARP is on for {conf.name} "
                                 f"(net.ipv4.conf.{conf.name}.proxy_arp)")


def build(count: int, venv: str | None = None, boot_timeout: float = 60) -> Bed:
    """Build a bed of ``count`` nodes whose Python image is ``venv`` (this one's) without dvcray.

    Raises:
        BedUnavailable: see ``check_host``.
    """
    started = time.monotonic()
    bed = empty(venv, count)
    try:
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.ip} {n.hostname}\n" for n in bed.nodes)
        for node in bed.nodes:
            attach(bed, node.netns, f"{bed.bridge}{node.name}", node.ip, hosts)
            _node_dirs(bed, node)
        for node in bed.nodes:
            bed.start(node, timeout=boot_timeout)
        for node in bed.nodes:
            _wait_ssh(bed, node, boot_timeout)
    except BaseException as exc:
        _torn_down_after(bed, exc)
        raise
    bed.built_s = time.monotonic() - started
    bed.save()
    _pause_if_asked("built")
    return bed


def empty(venv: str | None = None, count: int = 0) -> Bed:
    """A bed with its folder, keys, the image's whiteouts and the bridge, and ``count``
    machines named and recorded but not made yet (``build`` makes them; others join with
    ``add_machine``). Stale beds of killed runs are swept first.

    Raises:
        BedUnavailable: see ``check_host``; or the kernel refused a privileged step.
    """
    check_host()
    sweep_stale()
    bed_id = os.urandom(3).hex()
    bed = Bed(id=bed_id, dir=str(BEDS / bed_id), bridge=f"dvb{bed_id}", subnet="", owner_pid=os.getpid(),
              owner_start=_start_ticks(os.getpid()), venv=str(Path(venv or sys.prefix)))
    # The names of everything the bed will make are in bed.json before any of it exists.
    reserve(bed, count)
    folder = Path(bed.dir)
    try:
        _keys(folder)
        _whiteouts(folder / "whiteouts", Path(bed.venv))
        _bridge(bed)
    except BaseException as exc:
        _torn_down_after(bed, exc)
        raise
    return bed


def _torn_down_after(bed: Bed, exc: BaseException) -> None:
    """Tear ``bed`` down after ``exc`` stopped its build; a privilege the kernel refused is
    BedUnavailable (an unprivileged container), anything else the caller re-raises."""
    bed.teardown()
    if _not_permitted(exc):
        raise BedUnavailable(f"this machine refused what the bed needs ({exc}): root without the "
                             "privileges (an unprivileged container?)") from exc


def add_machine(bed: Bed, name: str, ip: str, hostname: str, authorized_keys: str = "",
                files: dict[str, str] | None = None, instance: str = "", boot_timeout: float = 60) -> Node:
    """A machine joins the bed at ``ip`` and boots: its namespaces, disk and sshd, which
    accepts the bed's key and ``authorized_keys`` (OpenSSH public keys, one a line);
    ``files`` (``{path under /root: text}``, mode 0600) are on its disk before it boots.
    Recorded in the bed before anything is made, so teardown finds what was made."""
    node = Node(name=name, netns=f"dvcray-{bed.id}-{name}", ip=ip, dir=str(Path(bed.dir) / name),
                hostname=hostname, instance=instance)
    bed.nodes.append(node)
    bed.save()
    attach(bed, node.netns, f"{bed.bridge}{name}", ip, f"127.0.0.1 localhost\n{ip} {hostname}\n")
    _node_dirs(bed, node, authorized_keys)
    for rel, text in (files or {}).items():
        target = node.root / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.write_text(text)
        os.chmod(target, 0o600)
    bed.start(node, timeout=boot_timeout)
    _wait_ssh(bed, node, boot_timeout)
    return node


def forget_machine(bed: Bed, node: Node, keep_disk: bool = False) -> None:
    """A machine leaves the bed for good: killed (by its init's pid), its namespace and
    link deleted (by name), its folder removed (with ``keep_disk``, left for a post-mortem
    until the bed goes)."""
    bed.kill(node)
    _run(["ip", "netns", "del", node.netns], check=False)
    shutil.rmtree(Path("/etc/netns") / node.netns, ignore_errors=True)
    if not keep_disk:
        shutil.rmtree(node.dir, ignore_errors=True)
    bed.nodes.remove(node)
    bed.save()


def add_namespace(bed: Bed, name: str, ip: str) -> str:
    """A network namespace on the bridge that is not a machine (a client's: commands run
    in it with ``ip netns exec``), at ``ip`` with an on-link default route and no gateway.
    Recorded in the bed: its processes are killed and it is deleted with the bed."""
    netns = f"dvcray-{bed.id}-{name}"
    bed.extra_netns.append(netns)
    bed.save()
    attach(bed, netns, f"{bed.bridge}{name}", ip, f"127.0.0.1 localhost\n")
    return netns


def reserve(bed: Bed, count: int, choices: range = range(1, 255)) -> None:
    """Give ``bed`` a /24 no other bed has, its folder and ``count`` nodes, and record it.

    Two builds at once (other test sessions on this machine) take turns here, under a
    lock: each sees the /24s on this machine's links and routes and those recorded by
    every bed folder, so none picks another's.

    Raises:
        BedUnavailable: no free /24 among ``choices``.
    """
    BEDS.mkdir(parents=True, exist_ok=True)
    os.chmod(BEDS, 0o700)
    with open(BEDS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _run(["ip", "-4", "-o", "addr", "show"], check=True).stdout + \
            _run(["ip", "-4", "route", "show"], check=True).stdout
        taken = {f"{PREFIX}.{x}." for x in choices if f"{PREFIX}.{x}." in used}
        for folder in BEDS.iterdir():
            try:
                taken.add(json.loads((folder / "bed.json").read_text())["subnet"] + ".")
            except (OSError, ValueError, KeyError, TypeError):
                continue
        free = [x for x in choices if f"{PREFIX}.{x}." not in taken]
        if not free:
            raise BedUnavailable(f"no free /24 left in {PREFIX}.0.0/16")
        bed.subnet = f"{PREFIX}.{random.choice(free)}"
        Path(bed.dir).mkdir(mode=0o700)
        for i in range(count):
            bed.nodes.append(Node(name=f"n{i}", netns=f"dvcray-{bed.id}-n{i}", ip=f"{bed.subnet}.{10 + i}",
                                  dir=str(Path(bed.dir) / f"n{i}"), hostname=f"bed{bed.id}-n{i}"))
        bed.save()


def _not_permitted(exc: BaseException) -> bool:
    """The kernel refused a privileged step (EPERM/EACCES), as in an unprivileged container."""
    if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("operation not permitted" in text or "permission denied" in text)


# Set by tests of the bed's own cleanup (tests/func/test_testbed.py): the build stops
# (sleeps) at this point, for the test to kill it there ("node-started": a node's init
# runs but is not recorded; "built": the whole bed is up).
PAUSE_ENV = "DVCRAY_TESTBED_PAUSE_AT"


def _pause_if_asked(point: str) -> None:
    if os.environ.get(PAUSE_ENV) != point:
        return
    print(f"PAUSED AT {point}", flush=True)
    while True:
        time.sleep(60)


def _keys(folder: Path) -> None:
    for name in ("host_key", "id_bed"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dvcray-bed-{name}", "-f", str(folder / name)])


def _dvcray_paths(venv: Path) -> list[Path]:
    """What of dvcray lives in ``venv`` (relative paths): its package, dist-info, .pth, script."""
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    found: set[Path] = set()
    if purelib.is_dir():
        for entry in purelib.iterdir():
            name = entry.name.lower()
            if name.startswith(("dvcray_cli", "dvcray-", "_dvcray", "__editable__.dvcray", "_editable_impl_dvcray")):
                found.add(entry.relative_to(venv))
    script = venv / "bin" / "dvcray"
    if script.exists():
        found.add(script.relative_to(venv))
    return sorted(found)


def _whiteouts(layer: Path, venv: Path) -> None:
    """An overlay layer that hides dvcray from the venv (a whiteout is a 0/0 character device)."""
    layer.mkdir()
    for rel in _dvcray_paths(venv):
        target = layer / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(target, 0o600 | 0o020000, os.makedev(0, 0))


def _hidden_base(venv: str) -> str | None:
    """The base Python of ``venv`` when a node would not see it (under /root or /tmp)."""
    base = os.path.realpath(sys.base_prefix)
    if base.startswith(("/root/", "/tmp/")) and not base.startswith(venv.rstrip("/") + "/"):
        return base
    return None


def _hidden_paths(bed_dir: Path) -> list[Path]:
    """Folders nodes must not see: this checkout and the bed's own folder."""
    repo = Path(__file__).resolve().parent.parent
    return [repo, bed_dir]


def _disable_ipv6(interface: str, netns: str | None = None) -> None:
    path = f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"
    if netns:
        _run(["ip", "netns", "exec", netns, "sh", "-c", f"[ ! -e {path} ] || echo 1 > {path}"])
    elif Path(path).exists():
        Path(path).write_text("1")


def _bridge(bed: Bed) -> None:
    _run(["ip", "link", "add", bed.bridge, "type", "bridge"])
    _disable_ipv6(bed.bridge)
    _run(["ip", "addr", "add", f"{bed.host_ip}/24", "dev", bed.bridge])
    _run(["ip", "link", "set", bed.bridge, "up"])


def attach(bed: Bed, netns: str, link: str, ip: str, hosts: str) -> None:
    """Make the network namespace ``netns`` with ``eth0`` at ``ip`` on the bed's bridge
    (its host end named ``link``), ``hosts`` as its /etc/hosts and no name server."""
    if len(link) > 15:
        raise ValueError(f"link name {link!r} is longer than 15 characters")
    _run(["ip", "netns", "add", netns])
    etc = Path("/etc/netns") / netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(hosts)
    (etc / "resolv.conf").write_text("# dvcray test bed: no name server\n")
    _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns])
    _disable_ipv6(link)
    _run(["ip", "link", "set", link, "master", bed.bridge])
    _run(["ip", "link", "set", link, "up"])
    for interface in ("all", "default", "lo", "eth0"):
        _disable_ipv6(interface, netns)
    _run(["ip", "-n", netns, "link", "set", "lo", "up"])
    _run(["ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    # On-link, no gateway: Ray's "which address do I use" finds eth0's, nothing is routed.
    _run(["ip", "-n", netns, "route", "add", "default", "dev", "eth0"])


def _node_dirs(bed: Bed, node: Node, authorized_keys: str = "") -> None:
    nd = Path(node.dir)
    nd.mkdir()
    for sub in ("upper", "work"):
        (nd / sub).mkdir()
    root = nd / "root"
    (root / ".ssh").mkdir(parents=True)
    os.chmod(root, 0o700)
    os.chmod(root / ".ssh", 0o700)
    pub = (Path(bed.dir) / "id_bed.pub").read_text()
    (root / ".ssh" / "authorized_keys").write_text(pub + authorized_keys.strip() + "\n" if authorized_keys else pub)
    os.chmod(root / ".ssh" / "authorized_keys", 0o600)
    # The machine's Python: login shells (Ray runs every command in one) put the image first.
    # No tool on a node phones home (nothing could leave the bridge anyway).
    (root / ".profile").write_text(f"export PATH={bed.venv}/bin:$PATH\n"
                                   "export DVC_NO_ANALYTICS=1 DVC_STUDIO_OFFLINE=true RAY_USAGE_STATS_ENABLED=0\n")
    (root / ".bashrc").write_text("")
    # Nothing on a node may reach a package index: pip installs from files only.
    pip = root / ".config" / "pip"
    pip.mkdir(parents=True)
    (pip / "pip.conf").write_text("[global]\nno-index = true\ndisable-pip-version-check = true\n")
    (nd / "sshd_config").write_text(SSHD_CONFIG.format(ip=node.ip))


def _wait_ssh(bed: Bed, node: Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = bed.ssh(node, "true", timeout=30, login=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"ssh to node {node.name} failed: {proc.stderr}")
        time.sleep(0.2)


# ---------------------------------------------------------------------- stale beds


def sweep_stale(owner: int | None = None) -> list[str]:
    """Tear down beds whose owner process is gone (a test run that was killed; a pid now
    held by another process counts as gone), and those of ``owner`` (a session ending:
    nothing it built outlives it). Every test session sweeps when it starts and ends."""
    swept = []
    if not BEDS.is_dir():
        return swept
    for folder in BEDS.iterdir():
        if not folder.is_dir():
            continue
        try:
            bed = Bed.load(folder)
        except (OSError, ValueError, TypeError, KeyError):
            # No record: a build killed before it wrote one, so it made nothing but the folder.
            if not (folder / "bed.json").exists() and time.time() - folder.stat().st_mtime > 60:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        if bed.owner_alive() and bed.owner_pid != owner:
            continue
        bed.teardown()
        swept.append(bed.id)
    return swept


# ---------------------------------------------------------------------- helpers


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def _alive(pid: int) -> bool:
    return bool(pid) and _state(pid) not in ("", "Z")


def _ns_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _child_of(pid: int, timeout: float) -> int:
    """The first child of ``pid`` that runs in another PID namespace (unshare's forked init)."""
    deadline = time.monotonic() + timeout
    mine = _ns_of(pid)
    while time.monotonic() < deadline:
        # ip netns exec execs unshare (same pid); unshare forks the init.
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for child in children:
            ns = _ns_of(int(child))
            if ns and ns != mine:
                return int(child)
        time.sleep(0.05)
    raise RuntimeError(f"no init process appeared under pid {pid}")


def _start_ticks(pid: int) -> int:
    """When ``pid`` started (clock ticks after boot): with the pid, names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def server_entry(pid: int) -> list[int]:
    """``[pid, start time]`` of a server the bed started, for ``Bed.servers``."""
    return [pid, _start_ticks(pid)]


def kill_netns_processes(netns: str, timeout: float = 10) -> list[str]:
    """SIGKILL every process that lives in the network namespace ``netns`` (one the bed
    made: what runs there was started in it by the bed's user); returns problems."""
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.stat(entry / "ns" / "net").st_ino == inode and _state(int(entry.name)) != "Z":
                        found.append(int(entry.name))
                except OSError:
                    continue
        if not found:
            return []
        if time.monotonic() > deadline:
            return [f"processes {found} kept running in {netns}"]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", name], check=False).returncode == 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["up"]:
        made = build(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
        made.owner_pid, made.owner_start = 1, _start_ticks(1)  # kept until `down`
        made.save()
        print(made.dir, made.host_ip, [n.ip for n in made.nodes], f"built in {made.built_s:.1f}s")
    elif sys.argv[1:2] == ["down"]:
        print(Bed.load(Path(sys.argv[2])).teardown() or "down")
    else:
        print(__doc__)
