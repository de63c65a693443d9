"""Files: atomic writes, JSON-safe configs, the cache folder and PNG figures.

Every file the toolkit writes goes through `atomic_write`: it is written under a temporary name in
the same folder, flushed to disk and renamed onto its final name, so a crash never leaves a
half-written file there. A folder that is one artifact (a saved dictionary, a saved suite) is
written whole through `atomic_folder`: into a fresh folder beside it, which then takes the old one's
place in one atomic exchange, so a reader sees the old save or the new one, never a mix. This module
imports nothing of the package, so every room may use it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def cache_dir() -> Path:
    """Where converted models and corpora are cached (`$DICTIONARY_LEARNING_CACHE`, else
    ~/.cache/...)."""
    root = (os.environ.get("DICTIONARY_LEARNING_CACHE")
            or Path.home() / ".cache" / "dictionary_learning")
    return Path(root)


def error_summary(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` of an error, for wrapping it in a clearer one."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(path: Path, suffixes: tuple[str, ...]) -> None:
    """Remove `.{name}.{pid}{suffix}` leftovers of `path` written by processes that no longer run (a
    kill -9 mid-write leaves them; they would otherwise pile up)."""
    if not path.parent.is_dir():
        return
    for leftover in path.parent.glob(f".{path.name}.*"):
        pid, _, suffix = leftover.name[len(path.name) + 2:].partition(".")
        if (pid.isdigit() and "." + suffix in suffixes and int(pid) != os.getpid()
                and not _alive(int(pid))):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _fsync(path: str | Path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory and hasattr(os, "O_DIRECTORY")
                                          else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _file_mode(path: Path) -> int:
    """The permissions a new file at `path` gets: an existing file's own, else those of a plain
    `open` under the process's umask (writers such as safetensors create files readable by their
    owner only)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, flush the file to disk, then rename it onto `path` (same folder, so
    the rename is atomic), with the permissions of a plain new file (or of the file it replaces).
    Leftover temporary files of killed processes are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path, (".tmp",))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            write(str(tmp))
        # torch's zip writer reports a full or read-only disk as an "enforce fail"
        except RuntimeError as error:
            free = shutil.disk_usage(path.parent).free
            raise OSError(f"writing {str(path)!r} failed ({free / 2**20:.0f} MB free on its disk; "
                          f"full or read-only?): {error_summary(error)}") from error
        _fsync(tmp)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_folder(name: str, path: str | Path) -> None:
    """A clear error before any work when the folder `path` (existing or to be made) cannot be
    written: a file in the way, or a folder without write permission (a read-only file system
    too)."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{name} must be a folder, but {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{name} {str(path)!r} cannot be written: {str(parent)!r} is "
                                      "not writable")
            return


def inside(root: str | Path, name: Any, what: str = "a name") -> Path:
    """`root / name`, refused unless it stays inside `root`: a name read from a file (a hook path, a
    module name, a shard file, a layer file) must never lead out of the folder it names something in
    (absolute, `..`, a link)."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"{what} must be a non-empty relative name, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise ValueError(f"{what} {name!r} leads out of {str(root)!r}: only names inside it are "
                         "accepted")
    root = Path(root)
    target = root / relative
    resolved, base = target.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:  # a link inside pointing out
        raise ValueError(f"{what} {name!r} resolves to {str(resolved)!r}, outside {str(root)!r}")
    return target


class FolderInUse(RuntimeError):
    """Another writer holds the folder: refused at once rather than mixing two writers' files."""


_HELD: dict[str, int] = {}  # lock files this process holds, with how many nested holders


@contextmanager
def writer_lock(path: str | Path, what: str = "folder", key: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` while writing it: a second writer (another process, or
    another open of the lock in this one) gets `FolderInUse` at once. The lock is the file
    `.{name}.lock` beside `path` (`key` names another one there), removed when released; the system
    releases the lock when its holder exits or dies, so a killed writer blocks no one (its empty
    lock file is reused). Nested holds in one call stack are allowed."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{key or path.name}.lock"
    token = str(lock.resolve())
    if _HELD.get(token):
        _HELD[token] += 1
        try:
            yield
        finally:
            _HELD[token] -= 1
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"the {what} {str(path)!r} is being written by another writer (it "
                              f"holds {str(lock)!r}); wait for it to finish, or write "
                              "elsewhere") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        # its holder removed it between our open and our lock: take a fresh one
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD[token] = 1
    try:
        yield
    finally:
        del _HELD[token]
        lock.unlink(missing_ok=True)  # while still held, so no one locks the removed file
        os.close(fd)


def locks_folder(argument: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the function holds `writer_lock` on the folder its `argument` names (none when
    that is None) while it runs, so two calls writing one folder never mix their files. The
    signature is kept."""
    import functools
    import inspect

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = bound.arguments[argument]
            if folder is None:
                return function(*args, **kwargs)
            with writer_lock(folder, what):
                return function(*args, **kwargs)

        return locked

    return decorate


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system
    cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    # file system or kernel without it
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {str(a)!r} and {str(b)!r}: {os.strerror(code)}")


def _link_tree(source: Path, target: Path) -> None:
    """Make `target` a copy of `source`, hard-linking files where the file system allows it."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, copy_function=link, symlinks=True)
    else:
        link(str(source), str(target))


@contextmanager
def atomic_folder(path: str | Path,
                  owned: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """`with atomic_folder(path) as staging:` write the whole folder into `staging`; on leaving the
    block it replaces `path` in one atomic exchange (two renames where the system has no exchange),
    so a reader finds the old folder or the new one, never a mix of both; on an error `path` is left
    untouched. Entries of the old folder that the new one lacks and `owned(name)` does not claim
    (e.g. upstream's `checkpoints/` beside a dictionary's files) are carried over (hard links,
    else copies)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save a folder to {str(path)!r}: a file of that name "
                                 "exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path):
        with _atomic_folder(path, owned) as staging:
            yield staging


@contextmanager
def _atomic_folder(path: Path, owned: Callable[[str], bool]) -> Iterator[Path]:
    _remove_stale(path, (".new", ".old"))
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        if path.is_dir():
            for entry in path.iterdir():
                if not owned(entry.name) and not (staging / entry.name).exists():
                    _link_tree(entry, staging / entry.name)
        _fsync(staging, directory=True)
        if not path.exists():
            os.rename(staging, path)
        elif not _exchange(staging, path):
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            # a crash between these two renames leaves no folder, the old one beside it
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent, directory=True)
    finally:
        if staging.exists():  # the old folder after an exchange, or a failed save's partial one
            shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_safe(config: dict[str, Any]) -> dict[str, Any]:
    """A config with classes, dtypes and devices turned into names, ready for json.dumps."""

    def convert(value):
        if isinstance(value, type):
            return value.__name__
        if isinstance(value, (torch.dtype, torch.device)):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    result = convert(config)
    json.dumps(result)  # fail here, not halfway through a file
    return result


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2))


def read_json(path: str | Path, expect: type | None = None) -> Any:
    """A JSON file's contents; a ValueError naming the file when it is not valid UTF-8 JSON (or not
    an `expect`)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a valid JSON file (corrupt or truncated?): "
                         f"{error}") from error
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{str(path)!r} must hold a JSON "
                         f"{'object' if expect is dict else expect.__name__}, got a "
                         f"{type(value).__name__}")
    return value


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a ValueError naming the file when it is missing, truncated or
    not one."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is missing")
    try:
        return load_file(str(path))
    # safetensors raises its own error types, OSError and others for a corrupt file
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (corrupt or "
                         f"truncated?): {error_summary(error)}") from error


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, so plots need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically, in the format its suffix names (.svg, .pdf; PNG
    otherwise), then close it."""
    suffix = Path(path).suffix.lstrip(".").lower()
    file_format = suffix if suffix in ("svg", "pdf") else "png"
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format=file_format))
    pyplot().close(figure)
