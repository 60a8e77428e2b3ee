"""The CPU kernel's cache cannot be hijacked: a directory or library another user created or can
write is never used (issue 10, item 5). Each test plants one and reloads the kernel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from neumann_optimizer import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason=f"no CPU kernel: {_native.unavailable_reason()}")

OTHER_UID = 65534  # nobody


@pytest.fixture
def reload(monkeypatch):
    """Load the kernel afresh (as a new process would); the module's state is restored after."""

    def go() -> Path | None:
        monkeypatch.setattr(_native, "_tried", False)
        monkeypatch.setattr(_native, "_lib", None)
        monkeypatch.setattr(_native, "_path", None)
        path = _native.library_path()
        assert path is not None, _native.unavailable_reason()
        return path

    return go


def _make_foreign(path: Path, monkeypatch) -> None:
    """Owned by another user: chown where we may (root, as in CI), else we become another user."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    else:
        real = os.getuid()
        monkeypatch.setattr(_native, "_uid", lambda: real + 1)


def test_a_private_cache_is_created_0700_and_reused(tmp_path, monkeypatch, reload):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEUMANN_OPTIMIZER_CACHE", str(cache))
    first = reload()
    assert first.parent == cache
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert not first.stat().st_mode & 0o022
    mtime = first.stat().st_mtime_ns
    assert reload() == first and first.stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


def test_a_world_writable_cache_dir_is_not_used(tmp_path, monkeypatch, reload):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # as another user could have left it
    monkeypatch.setenv("NEUMANN_OPTIMIZER_CACHE", str(cache))
    monkeypatch.setattr(_native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = reload()
    assert cache not in path.parents
    assert list(cache.iterdir()) == []  # nothing written there either


def test_a_foreign_owned_cache_dir_is_not_used(tmp_path, monkeypatch, reload):
    cache = tmp_path / "planted"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv("NEUMANN_OPTIMIZER_CACHE", str(cache))
    monkeypatch.setattr(_native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _make_foreign(cache, monkeypatch)
    path = reload()
    assert cache not in path.parents


@pytest.mark.parametrize("how", ["world-writable", "foreign-owned", "symlink"])
def test_a_planted_library_in_the_cache_is_not_loaded(tmp_path, monkeypatch, reload, how):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEUMANN_OPTIMIZER_CACHE", str(cache))
    genuine = reload()  # learn the file name the cache would use
    planted = cache / genuine.name
    elsewhere = tmp_path / "evil.so"
    shutil.copyfile(genuine, elsewhere)
    planted.unlink()
    if how == "symlink":
        planted.symlink_to(elsewhere)
    else:
        shutil.copyfile(elsewhere, planted)
        if how == "world-writable":
            planted.chmod(0o777)
        else:
            _make_foreign(planted, monkeypatch)
            if os.geteuid() != 0:  # _uid now differs from the owner of the cache dir too ...
                monkeypatch.setattr(_native, "_is_private_dir", lambda d: d == cache)  # ... keep it ours
    path = reload()
    assert path != planted and path.resolve() != elsewhere.resolve()
    assert cache not in path.parents  # compiled into a fresh private directory instead
    assert (path.parent.stat().st_mode & 0o777) == 0o700
