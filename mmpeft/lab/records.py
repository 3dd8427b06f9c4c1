"""What every result file of the lab shares: the W&B mode, the header that says how a result was made (command,
versions, commit, date), the run folders and the mean ± std over seeds."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mmpeft.version import __version__

__all__ = [
    "wandb_mode",
    "claim_version",
    "process_environment",
    "git_commit",
    "versions_line",
    "command_line",
    "made_with",
    "mean_std",
]

REPO = Path(__file__).resolve().parents[2]  # the checkout mmpeft runs from (when it is one)


def wandb_mode(requested: str = "auto") -> str:
    """'disabled' | 'offline' | 'online'. auto: WANDB_MODE if set, else online only with an API key."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "offline", "online", "dryrun"):
        return "offline" if env == "dryrun" else env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read():
        return "online"
    return "offline"


def claim_version(base: Path) -> int:
    """The next free N of `base/version_N`, its folder created at once: `mkdir` fails when the folder exists, so
    two runs of one name started together never share (or overwrite) a folder. Lightning's CSVLogger only lists
    the folders and creates its own at the first write, so both would take the same N.

    Ranks other than 0 of a multi-process run claim nothing: they get the newest folder (rank 0's, claimed before
    it launched them), and write no logs."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    numbers = (p.name.removeprefix("version_") for p in base.glob("version_*"))
    newest = max((int(n) for n in numbers if n.isdigit()), default=-1)
    if getattr(rank_zero_only, "rank", 0) != 0:
        return max(newest, 0)
    base.mkdir(parents=True, exist_ok=True)
    version = newest + 1
    while True:
        try:
            (base / f"version_{version}").mkdir()
            return version
        except FileExistsError:  # another run took it between the listing and now
            version += 1


def process_environment() -> dict[str, str]:
    """What a benchmark number depends on: versions, threads, CPU / GPU model."""

    env = {"python": platform.python_version(), "torch": torch.__version__, "mmpeft": __version__,
           "threads": str(torch.get_num_threads())}  # fmt: skip
    for package in ("timm", "peft", "diffusers"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        env["cpu"] = platform.processor() or "unknown"
    env["cpus"] = str(os.cpu_count())
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def git_commit(where: Path = REPO) -> str:
    """', git <short hash>[ + uncommitted changes]' of the checkout mmpeft runs from, '' outside one."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return ""
    return f", git {commit}" + (" + uncommitted changes" if dirty else "")


def versions_line(packages: Sequence[str] = ("torch", "pytorch_lightning")) -> str:
    """'torch X, pytorch_lightning Y, mmpeft Z, git <hash>': the versions a result file names."""
    found = []
    for package in packages:
        try:
            found.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            pass
    return ", ".join([*found, f"mmpeft {__version__}"]) + git_commit()


def command_line(program: str, argv: Sequence[str]) -> str:
    """The shell command that made a result (`mmpeft bench ...`), quoted so it can be pasted back."""
    return " ".join([program, *(shlex.quote(a) for a in argv)])


def made_with(command: str, versions: str | None = None, date: str | None = None) -> str:
    """The header line every result file starts from: "Made with `CMD` on DATE (VERSIONS)"."""
    return f"Made with `{command}` on {date or time.strftime('%Y-%m-%d')} ({versions or versions_line()})"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def refuse_overwrite(paths: Sequence[Path], overwrite: bool) -> None:
    """Result files are never replaced silently: existing ones need `--overwrite`."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"result file(s) {', '.join(existing)} exist; pass --overwrite to replace them")
