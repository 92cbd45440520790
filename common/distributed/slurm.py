"""What SLURM's environment says about a job step: the nodelist ('node[01-03]'), the
master address and port every task derives the same way (and whether that address
resolves), this task's rank, and how many tasks share its node. `common/distributed/launch.py` uses
it when srun started the processes."""
import os
import re
import shutil
import socket
import subprocess
from typing import List

from common.errors import UserError


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM nodelist: 'node[01-03,07],gpu-a1' -> ['node01', 'node02', 'node03', 'node07', 'gpu-a1']."""
    # split on commas that are not inside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: misplaced brackets; "
                            f"set MASTER_ADDR to the first host of the job instead")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: unbalanced brackets")
    parts.append(cur)

    hosts: List[str] = []
    for part in filter(None, parts):
        m = re.search(r"\[([^\]]*)\]", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, suffix = part[: m.start()], part[m.end():]
        for item in m.group(1).split(","):
            if not re.fullmatch(r"\d+(-\d+)?", item.strip()):
                raise UserError(f"cannot parse SLURM nodelist {nodelist!r}: {item!r} is not a number or range; "
                                f"set MASTER_ADDR to the first host of the job instead")
            item = item.strip()
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                for i in range(int(lo), int(hi) + 1):
                    # suffix may hold more bracket groups: expand recursively
                    hosts.extend(expand_nodelist(f"{prefix}{i:0{width}d}{suffix}"))
            else:
                hosts.extend(expand_nodelist(f"{prefix}{item}{suffix}"))
    if not hosts:
        raise UserError(f"SLURM nodelist {nodelist!r} names no host; set MASTER_ADDR to the first host of the job")
    return hosts


def slurm_master_addr(nodelist: str) -> str:
    """First host of the job; `scontrol show hostnames` when SLURM is installed, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def _nodelist_key() -> str:
    # the step's nodelist (srun) can be a subset of the job's; rank 0 runs on its first host
    return "SLURM_STEP_NODELIST" if "SLURM_STEP_NODELIST" in os.environ else "SLURM_JOB_NODELIST"


def slurm_env() -> dict:
    env = os.environ
    nodelist_key = _nodelist_key()
    required = ["SLURM_PROCID", "SLURM_LOCALID"]
    required += [] if env.get("MASTER_ADDR") else [nodelist_key]
    required += [] if env.get("MASTER_PORT") else ["SLURM_JOB_ID"]
    missing = [k for k in required if not env.get(k)]
    if missing:
        raise UserError(f"SLURM launch is missing {', '.join(missing)}; start the script with "
                        f"`srun` inside an sbatch job (see slurm/pretrain.sbatch), or set them yourself")

    def number(key: str, value: str) -> int:
        if not value.strip().isdigit():
            raise UserError(f"{key}={value!r} is not a number; start the script with `srun` inside an sbatch job")
        return int(value)

    ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    ntasks = number(ntasks_key, env.get(ntasks_key, "1"))
    rank, local = number("SLURM_PROCID", env["SLURM_PROCID"]), number("SLURM_LOCALID", env["SLURM_LOCALID"])
    if rank >= ntasks:
        raise UserError(f"SLURM_PROCID {rank} is not below {ntasks_key} {ntasks}; start the script with `srun`")
    addr = env.get("MASTER_ADDR") or slurm_master_addr(env[nodelist_key])
    # a port derived from the job id: jobs sharing a node do not collide, and a requeued
    # job (same id) finds the same address again
    if env.get("MASTER_PORT"):
        port = number("MASTER_PORT", env["MASTER_PORT"])
    else:
        port = 15000 + number("SLURM_JOB_ID", env["SLURM_JOB_ID"]) % 20000
    return {"rank": rank, "world_size": ntasks, "local_rank": local, "init_method": f"tcp://{addr}:{port}"}


def host_resolves(host: str) -> bool:
    """Whether `host` has an address on this node. The rendezvous retries a name that does
    not resolve as if the master were merely late, until its timeout."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode, e.g. 'a..b'
        return False
    return True


def check_master_resolves(host: str) -> None:
    """Stop with one sentence when the SLURM master host (MASTER_ADDR, or the first host of
    the nodelist) has no address on this node."""
    if host_resolves(host):
        return
    here = socket.gethostname()
    if os.environ.get("MASTER_ADDR"):
        raise UserError(f"MASTER_ADDR={host!r} does not resolve to an address on this node ({here}); set MASTER_ADDR "
                        f"to the IP address of the node rank 0 runs on, or unset it to use the first host of the "
                        f"SLURM node list")
    key = _nodelist_key()
    raise UserError(f"the master host {host!r}, the first host of {key}={os.environ.get(key, '')!r}, does not resolve "
                    f"to an address on this node ({here}); set MASTER_ADDR to that node's IP address "
                    f"(slurm/pretrain.sbatch shows how), or check the node list")


def slurm_tasks_on_this_node() -> int:
    """Tasks of this step on this node. SLURM writes e.g. '4(x2),3': the count per node, in
    node order; SLURM_NODEID says which node this is."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    counts: List[int] = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return 1
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(os.environ.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)
