"""A real local two-node Slurm cluster for tests (launch/slurm_local.sh), plus job helpers."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch" / "slurm_local.sh"


class SlurmCluster:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.env = dict(os.environ)

    def up(self) -> "SlurmCluster":
        out = subprocess.run(["bash", str(SCRIPT), "up", str(self.state_dir)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            logs = "\n".join(
                f"== {p}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(self.state_dir.glob("log/*"))
            )
            raise RuntimeError(f"local Slurm cluster failed to start:\n{out.stdout}\n{out.stderr}\n{logs}")
        self.env["SLURM_CONF"] = str(self.state_dir / "etc" / "slurm.conf")
        return self

    def down(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "down", str(self.state_dir)], capture_output=True, timeout=60)

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, cwd=kw.pop("cwd", REPO_ROOT), **kw)

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        out = self.run("sbatch", "--parsable", *args, env=env or {})
        return out.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False)
        for tok in out.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, "-o", check=False)
        for tok in out.stdout.split():
            if tok.startswith(field + "="):
                return tok.split("=", 1)[1]
        return ""

    def wait(self, job_id: str, timeout: float = 600, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(
            f"job {job_id} still {self.job_state(job_id)} (reason: {self.job_field(job_id, 'Reason')}) after {timeout}s"
        )
