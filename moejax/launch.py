"""``moejax launch``: run one moejax command as N cooperating local processes (one machine).

``moejax launch --processes 4 --devices_per_process 2 -- train --gin_file=...`` starts 4 copies of
``moejax train --gin_file=... --coordinator_address=127.0.0.1:PORT --process_count=4
--process_index=i``, each seeing ``devices_per_process`` emulated CPU devices
(``--xla_force_host_platform_device_count``); together they form one 8-device global mesh, exactly
as the hosts of a TPU pod slice or the nodes of a GPU cluster do. Process 0's output is shown;
the others' go to ``<log_dir>/process_<i>.log``. If one process fails the others are stopped and
the launcher exits with its code.

On real clusters no launcher is needed: run the same ``moejax train`` command on every host with
``--multiprocess`` and JAX finds the coordinator itself (TPU pod slice: ``gcloud compute tpus tpu-vm
ssh NAME --worker=all --command='moejax train --multiprocess ...'``; SLURM GPU cluster:
``srun --ntasks-per-node=1 moejax train --multiprocess ...``), or pass the three coordinator flags
explicitly (any other scheduler).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int, base: dict | None) -> dict:
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch_local(argv: list[str], processes: int, devices_per_process: int = 1, *, port: int | None = None,
                 log_dir: str | None = None, env: dict | None = None, timeout: float | None = None) -> int:
    """Run ``moejax <argv>`` as ``processes`` local processes; returns the first non-zero exit code
    (0 when all succeed). ``argv`` must not contain the coordinator flags (they are added here)."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"need processes >= 1 and devices_per_process >= 1, got {processes}, {devices_per_process}")
    clash = [a for a in argv if a.split("=")[0] in ("--coordinator_address", "--process_count", "--process_index")]
    if clash:
        raise ValueError(f"moejax launch sets the coordinator flags itself; remove {clash}")
    addr = f"127.0.0.1:{port or free_port()}"
    log_dir = log_dir or tempfile.mkdtemp(prefix="moejax_launch_")
    os.makedirs(log_dir, exist_ok=True)
    procs, logs = [], []
    for i in range(processes):
        cmd = [sys.executable, "-m", "moejax.main", *argv, f"--coordinator_address={addr}",
               f"--process_count={processes}", f"--process_index={i}"]
        out = None
        if i > 0:
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        procs.append(subprocess.Popen(cmd, env=_env(devices_per_process, env), stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
    deadline = None if timeout is None else time.time() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.time() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.2)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    if code:
        print(f"moejax launch: a process failed (exit {code}); logs of processes 1..{processes - 1} in {log_dir}",
              file=sys.stderr)
    return code
