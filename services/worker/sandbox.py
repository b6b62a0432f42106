"""What a trial runs as on this host: an unprivileged user, a private work dir, an interpreter it can reach.

When the worker is root, trials run as ``trial_user`` (default ``kiln-trial``, created with ``useradd
--system`` if missing): they cannot read the stack's secrets (credentials.json, configs, the state dir's
data) nor any service's ``/proc/<pid>/environ``. When the worker is not root it cannot switch users, and
trials run as the worker's own user (they can then read what the worker can; README "Security").

The trial's Python must be reachable by that user. A venv whose base interpreter lives under a directory
the user cannot traverse (pyenv under ``/root``, mode 0700) is made reachable by copying the base
interpreter's runtime (binary, libpython, standard library: about 60 MB, once per host) into the work dir
and pointing a small venv there at the worker venv's site-packages. If even that does not import
``kiln``, the worker refuses to start and says which directory is in the way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import msgspec
import structlog

log = structlog.get_logger(__name__)

DEFAULT_TRIAL_USER = "kiln-trial"
# What a trial's interpreter must import for kiln.core to work.
_PROBE = "import kiln.core, kiln.core._bus, msgspec, httpx"
# Parts of the standard library a trial never needs: not copied into the runtime.
_SKIP = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "config-*")


class SandboxError(RuntimeError):
    """Trials cannot be run safely here as configured; the message says why and what to change."""


class TrialUser(msgspec.Struct, frozen=True, kw_only=True):
    """The OS identity trials run as."""

    name: str
    uid: int
    gid: int


class TrialRuntime(msgspec.Struct, frozen=True, kw_only=True):
    """How this worker starts trial processes: as whom, with which interpreter, with what extra env."""

    user: TrialUser | None  # None: as the worker's own user
    python: str
    env: dict[str, str] = {}

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) files and sockets of an allocation are given to, or None (the worker's own)."""
        return None if self.user is None else (self.user.uid, self.user.gid)


def trial_user(name: str) -> TrialUser | None:
    """The user trials run as: ``name`` (created if missing) when the worker is root, else None."""
    if os.geteuid() != 0:
        return None
    if name == "root":
        log.warning("sandbox.trials_as_root", why="trial_user is root: trials can read every secret on this host")
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True, check=False)
        if result.returncode not in (0, 9):  # 9: created meanwhile by another worker
            why = result.stderr.strip() or result.returncode
            raise SandboxError(f"cannot create trial user {name!r}: {why}") from None
        pw = pwd.getpwnam(name)
        log.info("sandbox.user_created", user=name, uid=pw.pw_uid)
    if pw.pw_uid == 0:
        raise SandboxError(f"trial user {name!r} has uid 0; choose an unprivileged user")
    return TrialUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid)


def blocked_dir(path: Path, user: TrialUser | None) -> Path | None:
    """The first directory on the way to ``path`` that ``user`` may not traverse, or None."""
    if user is None:
        return None
    groups = set(os.getgrouplist(user.name, user.gid))
    for p in reversed([*Path(path).parents]):
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        bit = stat.S_IXUSR if st.st_uid == user.uid else stat.S_IXGRP if st.st_gid in groups else stat.S_IXOTH
        if not st.st_mode & bit:
            return p
    return None


def _probe(python: str, user: TrialUser | None, env: dict[str, str]) -> str:
    """"" if ``python`` imports what a trial needs when run as ``user``; else its error."""
    probe_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **env}
    try:
        result = subprocess.run(
            [python, "-c", _PROBE], env=probe_env, cwd="/",
            capture_output=True, text=True, timeout=120, check=False,
            user=None if user is None else user.uid, group=None if user is None else user.gid,
            extra_groups=None if user is None else [])
    except OSError as exc:
        return str(exc)
    if result.returncode == 0:
        return ""
    return (result.stderr.strip().splitlines() or ["exit " + str(result.returncode)])[-1]


def _copy_runtime(root: Path) -> tuple[str, dict[str, str]]:
    """A copy of the base interpreter under ``root`` with a venv onto this worker's site-packages."""
    base = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    key = hashlib.sha256(f"{base}|{sys.version}|{sys.prefix}".encode()).hexdigest()[:12]
    target = root / f"{ver}-{key}"
    venv_python = target / "venv" / "bin" / "python"
    env = {"LD_LIBRARY_PATH": str(target / "lib")}
    if venv_python.exists():
        return str(venv_python), env
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    tmp = root / f".{target.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bin").mkdir(parents=True)
    shutil.copy2(Path(sys.executable).resolve(), tmp / "bin" / ver)
    (tmp / "lib").mkdir()
    for lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(lib, tmp / "lib" / lib.name, follow_symlinks=False)
    stdlib = base / "lib" / ver
    shutil.copytree(stdlib, tmp / "lib" / ver, symlinks=True,
                    ignore=lambda d, names: {n for n in names for pat in _SKIP
                                             if Path(d) == stdlib and fnmatch.fnmatch(n, pat)})
    (tmp / "lib" / ver / "site-packages").mkdir()
    # A venv on the copy that sees the worker venv's packages (their .pth files included: kiln's editable
    # install is one).
    venv = tmp / "venv"
    site = venv / "lib" / ver / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(f"../../bin/{ver}")
    (venv / "bin" / "python3").symlink_to("python")
    (venv / "pyvenv.cfg").write_text(f"home = {target / 'bin'}\ninclude-system-site-packages = false\n"
                                     f"version = {sys.version_info.major}.{sys.version_info.minor}."
                                     f"{sys.version_info.micro}\n")
    worker_site = sysconfig.get_path("purelib")
    (site / "_kiln_worker_site.pth").write_text(f"import site; site.addsitedir({worker_site!r})\n")
    for p in [tmp, *tmp.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if p.is_dir() or os.access(p, os.X_OK) else 0))
    try:
        tmp.rename(target)
    except OSError:  # another worker of this host made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(venv_python), env


def prepare(name: str, work_dir: Path) -> TrialRuntime:
    """Resolve the trial user and an interpreter it can run; SandboxError with advice if there is none."""
    user = trial_user(name)
    python = sys.executable
    why = _probe(python, user, {})
    if not why:
        return TrialRuntime(user=user, python=python)
    assert user is not None  # the worker's own user runs its own interpreter
    blocked = blocked_dir(Path(python), user) or blocked_dir(Path(python).resolve(), user)
    log.warning("sandbox.python_unreachable", user=user.name, python=python, blocked=str(blocked or ""), error=why)
    copied, env = _copy_runtime(work_dir / ".runtime")
    why2 = _probe(copied, user, env)
    if why2:
        blocked2 = blocked_dir(Path(copied), user)
        raise SandboxError(
            f"trial user {user.name!r} cannot run this worker's Python ({python}: {why}"
            + (f"; {blocked} is not traversable by it" if blocked else "") + f"), nor a copy of it ({copied}: {why2}"
            + (f"; {blocked2} is not traversable by it: the work dir must be" if blocked2 else "") + ")."
            " Install Kiln's venv and its base Python where that user can read them (e.g. under /opt or /srv),"
            " or set KILN_TRIAL_USER=root to run trials as root (they can then read every secret on this host).")
    log.info("sandbox.python_copied", user=user.name, python=copied, because=str(blocked or why))
    return TrialRuntime(user=user, python=copied, env=env)


def prune_work_dirs(root: Path, keep: int, running: set[str]) -> list[str]:
    """Remove ended allocations' work dirs under ``root`` but the ``keep`` newest; the names removed."""
    try:
        dirs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
                and p.name not in running]
    except FileNotFoundError:
        return []
    dirs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for p in dirs[max(keep, 0):]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def give_to(path: Path, owner: tuple[int, int] | None) -> None:
    """Make ``path`` (a tree) the trial user's; the top directory 0700 whoever owns it."""
    if owner is not None:
        for dirpath, dirnames, filenames in os.walk(path):
            os.chown(dirpath, *owner, follow_symlinks=False)
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), *owner, follow_symlinks=False)
    path.chmod(0o700)
