"""A real one-node SLURM cluster on localhost, for the workflow's SLURM tests.

Debian's packages (SLURM 22.05, munge, MariaDB) are installed with apt-get; the daemons run in
the foreground under ``setsid``, with every config, state, log and socket file in one folder,
and are stopped by their process ids. The one exception is ``/etc/slurm/slurm.conf``: the
executor plugin's in-job helper drops ``SLURM_CONF`` before its inner ``srun``, so the default
path must lead to this cluster's config (a symlink, removed and the old file put back at the end).
The node is described with 4 CPUs (the jobs each take 2, the machine's count) and two fake GPUs
(character devices, as SLURM's gres plugin requires), so that two GPU jobs can run at once.
"""

import contextlib
import csv
import getpass
import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "ACCOUNT",
    "CPUS",
    "GPUS",
    "CPU_PARTITION",
    "GPU_PARTITION",
    "SlurmCluster",
    "install_packages",
    "running_cluster",
    "unmet_needs",
]

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
PROGRAMS = ("munged", "mungekey", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
PROGRAMS += ("sbatch", "sacct", "sacctmgr", "sinfo", "srun")
CLUSTER = "d2retrain"
CPUS = 2  # threads of each job (--max-threads), as many as the machine has
NODE_CPUS = 4  # the node as described: two jobs of CPUS threads at once
GPUS = 2
ACCOUNT = "ci"  # root's account
CPU_PARTITION = "cpu"  # the default partition
GPU_PARTITION = "gpu"  # the same node, for the config's cluster.gpu_partition
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def unmet_needs() -> str | None:
    """Why this machine cannot host the test cluster (not root, no apt-get/dpkg), or None."""
    if os.geteuid() != 0:
        return "the SLURM tests install Debian packages and start daemons: they need root"
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        return f"the SLURM tests install SLURM from Debian's packages: {', '.join(missing)} not found"
    return None


@contextlib.contextmanager
def _services_kept_down() -> Iterator[None]:
    """A temporary ``policy-rc.d`` that forbids package scripts to start services; an existing
    one is put back afterwards."""
    saved = POLICY_RC.read_bytes() if POLICY_RC.exists() else None
    POLICY_RC.write_text("#!/bin/sh\n# written by d2retrain's SLURM tests while installing\nexit 101\n")
    POLICY_RC.chmod(0o755)
    try:
        yield
    finally:
        if saved is None:
            POLICY_RC.unlink()
        else:
            POLICY_RC.write_bytes(saved)


def install_packages() -> None:
    """Install SLURM, munge and MariaDB from Debian's packages unless their programs are there.

    Package scripts may not start the services (the test starts its own); when the package
    lists are stale, they are updated once and the install retried.

    Raises:
        RuntimeError: apt-get failed (its output is in the message).
    """
    if all(shutil.which(program) for program in PROGRAMS):
        return
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    with _services_kept_down():
        if _apt(install).returncode != 0:
            for command in (["apt-get", "update", "-q"], install):
                result = _apt(command)
                if result.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}")


def _apt(command: list[str]) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, what: str, logs: list[Path], timeout: float = 60.0) -> None:
    """Poll ``condition()`` until true; on timeout fail with the daemons' log tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:] if log.exists() else '(none)'}" for log in logs)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s\n{tails}")


def _answers(command: list[str], environment: dict[str, str]) -> bool:
    return subprocess.run(command, env=environment, capture_output=True, check=False).returncode == 0


@dataclass
class SlurmCluster:
    """A running cluster: its folder, the environment its clients need, its daemons.

    Attributes:
        folder: Holds every config, state, log and socket file.
        environment: ``os.environ`` plus ``SLURM_CONF`` pointing at this cluster's config.
        daemons: The daemons started, in start order.
    """

    folder: Path
    environment: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start one daemon in its own session, its output to ``<folder>/<name>.out``."""
        with open(self.folder / f"{name}.out", "wb") as output:
            daemon = subprocess.Popen(
                command, env=self.environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.daemons.append(daemon)
        return daemon

    def run(self, *command: str) -> str:
        """Run a SLURM client (sacctmgr, sinfo, ...) against this cluster; return its stdout."""
        return subprocess.run(
            command, env=self.environment, capture_output=True, text=True, check=True
        ).stdout

    def stop(self) -> None:
        """Stop the daemons by their ids, last started first (SIGTERM, then SIGKILL after 15 s)."""
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        self.daemons.clear()

    def accounting(self, *fields: str) -> list[dict[str, str]]:
        """``sacct``'s records of every job and job step: one dict of ``fields`` per line."""
        text = self.run(
            "sacct", "--allusers", "--parsable2", "--starttime", "now-1days", "--format", ",".join(fields)
        )
        return list(csv.DictReader(io.StringIO(text), delimiter="|"))

    def settings(self, job_id: str) -> dict[str, str]:
        """What the controller holds of a job (``scontrol show job``: TimeLimit, NumCPUs,
        CPUs/Task, CpusPerTres, TresPerJob, MinMemoryNode, ...), finished jobs included."""
        return dict(re.findall(r"(\S+?)=(\S*)", self.run("scontrol", "--oneliner", "show", "job", job_id)))


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _write_configs(folder: Path, ports: dict[str, int]) -> None:
    """slurm.conf, gres.conf and slurmdbd.conf of a node with NODE_CPUS CPUs, GPUS GPUs and accounting."""
    munge_socket = folder / "munge" / "munge.socket"
    gpu_devices = [folder / f"gpu{index}" for index in range(GPUS)]
    for device in gpu_devices:
        os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
    _write(
        folder / "slurm.conf",
        f"""\
ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Finished jobs stay in the controller for an hour, for scontrol (sacct keeps them anyway).
MinJobAge=3600
InactiveLimit=0
# Time limits: no grace minutes; a job past its limit gets SIGTERM, then SIGKILL 5 s later.
OverTimeLimit=0
KillWait=5
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass=socket={munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# The node is described, not probed: CPUs and memory for two GPU jobs at once, and two GPUs.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory=65536 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={CPU_PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName={GPU_PARTITION} Nodes=localhost MaxTime=INFINITE State=UP
""",
    )
    devices = "".join(f"NodeName=localhost Name=gpu File={device}\n" for device in gpu_devices)
    _write(folder / "gres.conf", f"AutoDetect=off\n{devices}")
    _write(
        folder / "slurmdbd.conf",
        f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdPort={ports["slurmdbd"]}
SlurmUser=root
LogFile={folder}/slurmdbd.log
PidFile={folder}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadb"]}
StorageUser=root
StorageLoc=slurm_acct_db
""",
        mode=0o600,
    )


def _start_munge(cluster: SlurmCluster) -> None:
    folder = cluster.folder / "munge"
    folder.mkdir(mode=0o700)
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    files = {
        "socket": "munge.socket",
        "key-file": "munge.key",
        "pid-file": "munged.pid",
        "seed-file": "munged.seed",
    }
    options = [f"--{option}={folder / name}" for option, name in files.items()]
    cluster.start("munged", ["munged", "--foreground", "--force", *options])
    _wait_for(lambda: (folder / "munge.socket").exists(), "munged", [cluster.folder / "munged.out"])


def _start_mariadb(cluster: SlurmCluster, port: int) -> None:
    data = cluster.folder / "mariadb"
    options = ["--no-defaults", f"--datadir={data}", "--user=root"]
    subprocess.run(
        ["mariadb-install-db", *options, "--auth-root-authentication-method=normal", "--skip-test-db"],
        check=True,
        capture_output=True,
    )
    options += [f"--socket={cluster.folder / 'mariadb.socket'}", f"--port={port}", "--bind-address=127.0.0.1"]
    options += ["--skip-grant-tables", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=0"]
    cluster.start("mariadb", ["mariadbd", *options, f"--pid-file={cluster.folder / 'mariadb.pid'}"])

    def accepting() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    _wait_for(accepting, "MariaDB", [cluster.folder / "mariadb.out"])


def _start_slurm(cluster: SlurmCluster) -> None:
    folder = cluster.folder
    logs = [folder / name for name in ("slurmdbd.log", "slurmctld.log", "slurmd.log", "slurmd.out")]
    cluster.start("slurmdbd", ["slurmdbd", "-D"])
    _wait_for(lambda: _answers(["sacctmgr", "-n", "list", "cluster"], cluster.environment), "slurmdbd", logs)
    user = getpass.getuser()
    cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    cluster.run("sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}", "Description=tests")
    cluster.run("sacctmgr", "-i", "add", "user", user, f"Account={ACCOUNT}", f"Cluster={CLUSTER}")
    cluster.start("slurmctld", ["slurmctld", "-D", "-i"])
    _wait_for(lambda: _answers(["scontrol", "ping"], cluster.environment), "slurmctld", logs)
    cluster.start("slurmd", ["slurmd", "-D", "-N", "localhost"])

    def node_idle() -> bool:
        result = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"],
            env=cluster.environment,
            capture_output=True,
            text=True,
            check=False,
        )
        states = result.stdout.split()
        return bool(states) and all(state == "idle" for state in states)

    _wait_for(node_idle, "the node", logs)


@contextlib.contextmanager
def _default_config_pointing_at(config: Path) -> Iterator[None]:
    """Make ``/etc/slurm/slurm.conf`` a symlink to ``config``; put back what was there."""
    DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
    saved = DEFAULT_CONF.with_name("slurm.conf.before-d2retrain-tests")
    had_one = DEFAULT_CONF.is_symlink() or DEFAULT_CONF.exists()
    if had_one:
        os.replace(DEFAULT_CONF, saved)
    DEFAULT_CONF.symlink_to(config)
    try:
        yield
    finally:
        DEFAULT_CONF.unlink()
        if had_one:
            os.replace(saved, DEFAULT_CONF)


@contextlib.contextmanager
def running_cluster(folder: Path) -> Iterator[SlurmCluster]:
    """Start munged, MariaDB, slurmdbd, slurmctld and slurmd with their files in ``folder``;
    stop them, and restore ``/etc/slurm/slurm.conf``, on exit.

    The root user is associated with the account ``ci``; partitions ``cpu`` (default) and
    ``gpu`` share the node.

    Yields:
        The running cluster.

    Raises:
        RuntimeError: A daemon did not come up within a minute (its log tail is in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    ports = {name: _free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
    _write_configs(folder, ports)
    cluster = SlurmCluster(folder, {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")})
    with _default_config_pointing_at(folder / "slurm.conf"):
        try:
            _start_munge(cluster)
            _start_mariadb(cluster, ports["mariadb"])
            _start_slurm(cluster)
            yield cluster
        finally:
            cluster.stop()
