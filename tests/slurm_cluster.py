"""A real Slurm cluster for tests: munge, MariaDB, slurmdbd (accounting: NeMo-Run reads job
states with `sacct`), slurmctld and slurmd, configured in a scratch directory and stopped by pid.

One node (`start(root)`): every daemon on 127.0.0.1, the node named after this machine.

Two nodes (`start(root, nodes=2)`): each slurmd runs in its own network namespace and UTS
namespace (hostname node1 / node2) with its own address on a bridge this module creates
(10.213.N.0/24, N free on this machine; nothing outside the bridge is addressed). slurmctld
stays in the root namespace and listens on the bridge's address, which the nodes reach over
their veth. Each slurmd starts in a private mount namespace with /etc/netns/<namespace>/hosts
bind-mounted over /etc/hosts (as `ip netns exec` does), so node1, node2 and the controller
resolve inside both nodes (NeMo-Run's torchrun rendezvous is `hostname --ip-address` of the
first node, gloo binds to the address of the hostname). munge's socket and the filesystem are
shared, so jobs see the same repository and venv on both nodes. Job steps run in their node's
namespaces: `Cluster.network.pids(node)` lists them, `stop()` kills what is left there and
deletes the links, namespaces and /etc/netns files.

    python tests/slurm_cluster.py [NODES]   # start, print SLURM_CONF, wait for Ctrl-C

Debian's packages are installed when missing (root; ~1 min). Commands find the cluster through
the SLURM_CONF environment variable, which `start()` sets for this process and its children.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
CLUSTER = "nemooptim"


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root and packages missing, ...)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "slurmdbd", "sacct", "munged", "mariadbd")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed and this is not root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr[-500:]}")


@dataclass
class Network:
    """The bridge, veth pairs and namespaces of a multi-node cluster (names unique to it)."""
    bridge: str
    subnet: str  # "10.213.N"
    namespaces: dict[str, str] = field(default_factory=dict)  # node name -> namespace
    veths: list[str] = field(default_factory=list)

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.1"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{10 + list(self.namespaces).index(node) + 1}"

    def pids(self, node: str) -> list[int]:
        """Every process in `node`'s namespace (its slurmd, job steps, tasks)."""
        result = subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def exec(self, node: str, *command: str) -> list[str]:
        """`command` run as on `node`: in its network namespace, with its hostname and its
        /etc/hosts. (Not `ip netns exec`, which mounts a new /sys without the cgroup
        hierarchies slurmd's cgroup plugin reads.)"""
        namespace = self.namespaces[node]
        hosts = Path("/etc/netns") / namespace / "hosts"
        return ["nsenter", f"--net=/run/netns/{namespace}", "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", f'mount --bind {hosts} /etc/hosts && hostname {node} && exec "$@"', "sh", *command]

    def delete(self) -> None:
        for node, namespace in self.namespaces.items():
            for pid in self.pids(node):  # job processes the slurmd left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for veth in self.veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        try:
            Path("/etc/netns").rmdir()  # only when no other namespace has files there
        except OSError:
            pass
        self.namespaces.clear()
        self.veths.clear()


@dataclass
class Cluster:
    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    network: Network | None = None

    def stop(self) -> None:
        # reverse start order; each daemon by its pid
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        if self.network is not None:
            self.network.delete()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""


def _wait_for(check, what: str, cluster: Cluster, timeout: float = 60.0) -> None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if check():
            return
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                cluster.stop()
                raise SlurmUnavailable(f"{name} exited with {process.returncode} while waiting for {what}: "
                                       f"{cluster.log(name)}")
        time.sleep(0.5)
    cluster.stop()
    raise SlurmUnavailable(f"timed out waiting for {what}")


def _ok(*command: str) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def _start(cluster: Cluster, name: str, command: list[str]) -> None:
    log = (cluster.root / f"{name}.log").open("w")
    cluster.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SlurmUnavailable(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")


def _free_subnet() -> str:
    """10.213.N with no address of this machine in 10.213.N.0/24."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for third in range(os.getpid() % 200, os.getpid() % 200 + 250):
        subnet = f"10.213.{third % 250 + 1}"
        if f" {subnet}." not in used:
            return subnet
    raise SlurmUnavailable("no free 10.213.N.0/24 subnet for the test nodes")


def _make_network(host: str, nodes: list[str]) -> Network:
    """A bridge with the controller's address and, per node, a namespace joined to it by a veth
    pair, and that namespace's /etc/hosts."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "unshare", "nsenter")):
        raise SlurmUnavailable("a multi-node cluster needs root, iproute2 (ip netns), unshare and nsenter")
    tag = f"{os.getpid() % 100000}"
    network = Network(bridge=f"nosb{tag}", subnet=_free_subnet())
    try:
        _run("ip", "link", "add", network.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{network.controller_address}/24", "dev", network.bridge)
        _run("ip", "link", "set", network.bridge, "up")
        for node in nodes:
            namespace = f"nemo-optim-{tag}-{node}"
            _run("ip", "netns", "add", namespace)
            network.namespaces[node] = namespace
        hosts = "127.0.0.1 localhost\n" + f"{network.controller_address} {host}\n" + "".join(
            f"{network.address(node)} {node}\n" for node in nodes)
        for node, namespace in network.namespaces.items():
            veth = f"nosv{tag}{node[-2:]}"
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            network.veths.append(veth)
            _run("ip", "link", "set", veth, "master", network.bridge, "up")
            inside = ["ip", "netns", "exec", namespace]
            _run(*inside, "ip", "addr", "add", f"{network.address(node)}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            (Path("/etc/netns") / namespace).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / namespace / "hosts").write_text(hosts)
    except BaseException:
        network.delete()
        raise
    return network


def start(root: Path, cpus: int | None = None, nodes: int = 1) -> Cluster:
    """Starts every daemon under `root` and sets SLURM_CONF; returns the running cluster. With
    `nodes` > 1, nodes node1..nodeN, each slurmd in its own network namespace (module doc);
    `cpus` is then each node's CPU count (default: this machine's)."""
    ensure_installed()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    cpus = cpus or os.cpu_count() or 1
    ports = {name: _free_port() for name in ("mysql", "dbd", "ctld", "slurmd")}
    for sub in ("state", "spool", "mysql", "munge"):
        (root / sub).mkdir(exist_ok=True)
    cluster = Cluster(root=root, conf=root / "slurm.conf")
    if nodes > 1:
        cluster.nodes = [f"node{index + 1}" for index in range(nodes)]
        cluster.network = _make_network(host, cluster.nodes)
        controller = cluster.network.controller_address
        node_lines = "".join(
            f"NodeName={node} NodeHostname={node} NodeAddr={cluster.network.address(node)} CPUs={cpus} "
            f"State=UNKNOWN\n" for node in cluster.nodes)
        # per-node files: %n is the node's name
        slurmd_files = (f"SlurmdSpoolDir={root / 'spool' / '%n'}\nSlurmdPidFile={root / 'slurmd.%n.pid'}\n"
                        f"SlurmdLogFile={root / 'slurmd.%n.daemon.log'}\nSlurmdParameters=config_overrides\n")
        for node in cluster.nodes:
            (root / "spool" / node).mkdir(parents=True, exist_ok=True)
    else:
        cluster.nodes = [host]
        controller = "127.0.0.1"
        node_lines = f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n"
        slurmd_files = (f"SlurmdSpoolDir={root / 'spool'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
                        f"SlurmdLogFile={root / 'slurmd.daemon.log'}\n")

    try:
        _start_daemons(cluster, host, ports, controller, node_lines, slurmd_files)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_daemons(cluster: Cluster, host: str, ports: dict[str, int], controller: str, node_lines: str,
                   slurmd_files: str) -> None:
    root = cluster.root
    # munge: slurm's authentication (the Debian package ships a key). Slurm's clients only look
    # for munged at its default socket, so ours goes there unless one already answers.
    if not _ok("bash", "-c", "munge -n | unmunge"):
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        _start(cluster, "munged", ["munged", "--foreground", "--force", f"--pid-file={root / 'munge' / 'munged.pid'}",
                                   f"--seed-file={root / 'munge' / 'seed'}"])
        _wait_for(lambda: _ok("bash", "-c", "munge -n | unmunge"), "munged", cluster)

    # MariaDB for slurmdbd, on a loopback port, data in root/mysql
    subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={root / 'mysql'}",
                    "--auth-root-authentication-method=socket"],
                   check=True, capture_output=True)
    mysql_socket = root / "mysql.sock"
    _start(cluster, "mariadbd", ["mariadbd", "--user=root", f"--datadir={root / 'mysql'}", f"--socket={mysql_socket}",
                                 f"--port={ports['mysql']}", "--bind-address=127.0.0.1",
                                 f"--pid-file={root / 'mysql.pid'}", "--skip-log-bin", "--innodb-buffer-pool-size=64M"])
    _wait_for(lambda: _ok("mariadb", f"--socket={mysql_socket}", "-e", "select 1"), "mariadbd", cluster)
    subprocess.run(["mariadb", f"--socket={mysql_socket}", "-e",
                    "create user if not exists 'slurm'@'127.0.0.1' identified by 'slurm';"
                    "grant all on slurm_acct_db.* to 'slurm'@'127.0.0.1'; flush privileges;"], check=True)

    common = "AuthType=auth/munge\n"
    dbd_conf = root / "slurmdbd.conf"
    dbd_conf.write_text(
        f"{common}DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={ports['dbd']}\nSlurmUser=root\n"
        f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={ports['mysql']}\n"
        f"StorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n"
        f"PidFile={root / 'slurmdbd.pid'}\nLogFile={root / 'slurmdbd.daemon.log'}\nDebugLevel=info\n"
    )
    dbd_conf.chmod(0o600)
    cluster.conf.write_text(
        f"ClusterName={CLUSTER}\nSlurmctldHost={host}({controller})\n{common}"
        f"SlurmUser=root\nSlurmdUser=root\nSlurmctldPort={ports['ctld']}\nSlurmdPort={ports['slurmd']}\n"
        f"StateSaveLocation={root / 'state'}\n{slurmd_files}"
        f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmctldLogFile={root / 'slurmctld.daemon.log'}\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n"
        f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
        f"AccountingStoragePort={ports['dbd']}\nJobAcctGatherType=jobacct_gather/none\n"
        "JobCompType=jobcomp/none\nSchedulerType=sched/backfill\nInactiveLimit=0\nKillWait=5\nMinJobAge=300\n"
        f"{node_lines}PartitionName=debug Nodes={','.join(cluster.nodes)} Default=YES MaxTime=INFINITE State=UP\n"
    )
    os.environ["SLURM_CONF"] = str(cluster.conf)  # slurmdbd.conf is read from the same directory

    _start(cluster, "slurmdbd", ["slurmdbd", "-D"])
    _wait_for(lambda: _ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", cluster)
    subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER], capture_output=True)
    subprocess.run(["sacctmgr", "-i", "add", "account", "default"], capture_output=True)
    subprocess.run(["sacctmgr", "-i", "add", "user", "root", "account=default"], capture_output=True)

    _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
    _wait_for(lambda: _ok("scontrol", "ping"), "slurmctld", cluster)
    if cluster.network is None:
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(cluster.conf)])
    else:
        for node in cluster.nodes:
            _start(cluster, f"slurmd.{node}",
                   cluster.network.exec(node, "slurmd", "-D", "-N", node, "-f", str(cluster.conf)))

    def nodes_idle() -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True)
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return (result.returncode == 0 and set(states) == set(cluster.nodes)
                and all(state in ("idle", "mix", "alloc") for state in states.values()))

    _wait_for(nodes_idle, "every slurmd to register", cluster)


def wait_for_job(job_id: str, timeout: float = 600.0) -> str:
    """The terminal sacct state of `job_id` (COMPLETED, FAILED, ...)."""
    began = time.monotonic()
    terminal = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")
    while time.monotonic() - began < timeout:
        result = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
                                capture_output=True, text=True)
        state = result.stdout.strip().split(" ")[0] if result.returncode == 0 else ""
        if state.startswith(terminal):
            return state
        time.sleep(1)
    return "TIMEOUT_WAITING"


if __name__ == "__main__":
    import tempfile

    import sys

    running = start(Path(tempfile.mkdtemp(prefix="slurm-")), nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"export SLURM_CONF={running.conf}")
    try:
        signal.pause()
    finally:
        running.stop()
