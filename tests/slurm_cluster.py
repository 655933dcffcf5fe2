"""A real one-node Slurm cluster for tests: munge, MariaDB, slurmdbd (accounting: NeMo-Run reads
job states with `sacct`), slurmctld and slurmd, all on localhost, configured in a scratch
directory and stopped by pid.

    python tests/slurm_cluster.py          # start, print SLURM_CONF, wait for Ctrl-C

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
class Cluster:
    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

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


def start(root: Path, cpus: int | None = None) -> Cluster:
    """Starts every daemon under `root` and sets SLURM_CONF; returns the running cluster."""
    ensure_installed()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    cpus = cpus or os.cpu_count() or 1
    ports = {name: _free_port() for name in ("mysql", "dbd", "ctld", "slurmd")}
    for sub in ("state", "spool", "mysql", "munge"):
        (root / sub).mkdir(exist_ok=True)
    cluster = Cluster(root=root, conf=root / "slurm.conf")

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
        f"ClusterName={CLUSTER}\nSlurmctldHost={host}(127.0.0.1)\n{common}"
        f"SlurmUser=root\nSlurmdUser=root\nSlurmctldPort={ports['ctld']}\nSlurmdPort={ports['slurmd']}\n"
        f"StateSaveLocation={root / 'state'}\nSlurmdSpoolDir={root / 'spool'}\n"
        f"SlurmctldPidFile={root / 'slurmctld.pid'}\nSlurmdPidFile={root / 'slurmd.pid'}\n"
        f"SlurmctldLogFile={root / 'slurmctld.daemon.log'}\nSlurmdLogFile={root / 'slurmd.daemon.log'}\n"
        "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
        "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\nReturnToService=2\n"
        f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
        f"AccountingStoragePort={ports['dbd']}\nJobAcctGatherType=jobacct_gather/none\n"
        "JobCompType=jobcomp/none\nSchedulerType=sched/backfill\nInactiveLimit=0\nKillWait=5\nMinJobAge=300\n"
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n"
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n"
    )
    os.environ["SLURM_CONF"] = str(cluster.conf)  # slurmdbd.conf is read from the same directory

    _start(cluster, "slurmdbd", ["slurmdbd", "-D"])
    _wait_for(lambda: _ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", cluster)
    subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER], capture_output=True)
    subprocess.run(["sacctmgr", "-i", "add", "account", "default"], capture_output=True)
    subprocess.run(["sacctmgr", "-i", "add", "user", "root", "account=default"], capture_output=True)

    _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
    _wait_for(lambda: _ok("scontrol", "ping"), "slurmctld", cluster)
    _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(cluster.conf)])

    def node_idle() -> bool:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
        return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")

    _wait_for(node_idle, "slurmd to register", cluster)
    return cluster


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

    running = start(Path(tempfile.mkdtemp(prefix="slurm-")))
    print(f"export SLURM_CONF={running.conf}")
    try:
        signal.pause()
    finally:
        running.stop()
