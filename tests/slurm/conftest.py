"""The Slurm dev cluster (slurm/dev/) as a session fixture, for tests that submit real jobs.

`slurm_dev` starts MariaDB, slurmdbd, slurmctld and two slurmd (nodes n1, n2 on loopback) in a
fresh state directory under pytest's tmp dir, once per session, and stops exactly those daemons
at the end. Every test in this folder is marked `slurm`; `pytest -m "not slurm"` leaves them out.
Without the Debian packages the tests fail (they do not skip) and say to run slurm/dev/install.sh:
CI installs them first, and a skip there would hide a broken install.

Slurm clients find the cluster through SLURM_CONF alone. Code that shells out itself (submitit
runs sbatch, sacct and scancel with the process environment) needs it in os.environ: use the
`slurm_environ` fixture. A fresh cluster numbers jobs from 1 again, so a submitit folder must
never be shared between sessions; `slurm_dev.submitit_dir` is new for each session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEV = REPO / "slurm" / "dev"
PARTITION = "dev"
NODES = ("n1", "n2")
INSTALL_HINT = "run `slurm/dev/install.sh` as root (Debian 12) to install Slurm, MariaDB and the n1/n2 host names"
# start.sh uses BASE+1, +2 (slurmd), +6 (MariaDB), +7 (slurmctld), +9 (slurmdbd); the first base
# whose ports are all free is taken, so a developer's own dev cluster on 17000 does not collide.
PORT_BASES = range(17000, 18000, 100)
PORT_OFFSETS = (1, 2, 6, 7, 9)
START_TIMEOUT_S = 180
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: runs jobs on the Slurm dev cluster (slurm/dev/; needs slurm/dev/install.sh)"
    )


# tryfirst: the mark must be there before `-m "not slurm"` deselects by it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.slurm)


@dataclass(frozen=True)
class SlurmDev:
    """A running dev cluster: where it lives and how a Slurm client reaches it."""

    state_dir: Path
    conf: Path  # SLURM_CONF
    env: dict[str, str]  # os.environ without the caller's SLURM_* variables, plus SLURM_CONF
    submitit_dir: Path  # empty at the start of the session
    partition: str = PARTITION
    nodes: tuple[str, ...] = NODES

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a Slurm client command (sbatch, sacct, scontrol, ...) against this cluster."""
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str) -> str:
        """Submits a batch job; returns its ID."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str | None:
        """The job's state as sacct reports it ("COMPLETED", "CANCELLED", ...), None before sacct knows it."""
        out = self.run(
            "sacct", "--noheader", "--parsable2", "--allocations", "--format=State", f"--jobs={job_id}"
        ).stdout
        lines = out.split("\n")
        # "CANCELLED by 0" → "CANCELLED"
        return lines[0].split()[0] if lines[0].strip() else None

    def wait_state(self, job_id: str, states: Iterable[str] = FINAL_STATES, timeout: float = 60) -> str:
        """Polls sacct until the job reaches one of `states`; returns that state."""
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in wanted:
                return state
            time.sleep(0.3)
        raise AssertionError(
            f"job {job_id} is {state} after {timeout}s, not one of {sorted(wanted)}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of each daemon log, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(parts)


def _free_port_base() -> int:
    for base in PORT_BASES:
        if all(_port_free(base + offset) for offset in PORT_OFFSETS):
            return base
    pytest.fail(f"no free port range for the Slurm dev cluster among {PORT_BASES}")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _client_env(conf: Path) -> dict[str, str]:
    # SLURM_* variables of an enclosing allocation (pytest run inside a job) would steer
    # sbatch/srun to that job; input variables like SBATCH_PARTITION would change the requests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    return env


@pytest.fixture(scope="session")
def slurm_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmDev]:
    missing = [
        tool
        for tool in ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd")
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.fail(f"the Slurm dev cluster needs {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Slurm dev cluster runs its daemons as root; run the Slurm tests as root", pytrace=False)

    state_dir = tmp_path_factory.mktemp("slurm-dev")
    start_env = dict(os.environ, SLURM_DEV_PORT_BASE=str(_free_port_base()))
    started = time.monotonic()
    proc = subprocess.run(
        [str(DEV / "start.sh"), str(state_dir)],
        env=start_env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        hint = f"\n{INSTALL_HINT}" if "install.sh" in proc.stderr else ""
        pytest.fail(
            f"slurm/dev/start.sh {state_dir} failed (exit {proc.returncode}):\n{proc.stderr}{hint}", pytrace=False
        )
    conf = state_dir / "etc" / "slurm.conf"
    assert proc.stdout.startswith("export SLURM_CONF="), proc.stdout
    print(f"Slurm dev cluster up in {time.monotonic() - started:.1f}s: {state_dir}")

    try:
        yield SlurmDev(
            state_dir=state_dir, conf=conf, env=_client_env(conf), submitit_dir=tmp_path_factory.mktemp("submitit")
        )
    finally:
        stop = subprocess.run(
            [str(DEV / "stop.sh"), str(state_dir)], capture_output=True, text=True, timeout=120, check=False
        )
        if stop.returncode != 0:
            pytest.fail(f"slurm/dev/stop.sh {state_dir} failed (exit {stop.returncode}):\n{stop.stderr}", pytrace=False)


@pytest.fixture
def slurm_environ(slurm_dev: SlurmDev, monkeypatch: pytest.MonkeyPatch) -> SlurmDev:
    """`slurm_dev`, with this process's environment pointed at it for the test (for submitit)."""
    for key in list(os.environ):
        if key not in slurm_dev.env:
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_CONF", str(slurm_dev.conf))
    return slurm_dev
