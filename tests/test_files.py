"""common/files.py: a replaced file is the old content or the new one, with the mode asked."""

import os
import stat

import pytest

from pytun.common import files


def test_write_atomic_replaces_with_the_mode_asked_whatever_the_umask(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    old_umask = os.umask(0)
    try:
        files.write_atomic(str(path), "new\n")
        assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
        files.write_atomic(str(path), b"\x00bytes", mode=0o640)
        assert path.read_bytes() == b"\x00bytes" and stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError):
        files.write_atomic(str(path), "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o601])
def test_a_secret_readable_by_group_or_others_is_refused(tmp_path, mode):
    path = tmp_path / "key"
    path.write_text("hunter2-content")
    os.chmod(path, mode)
    with pytest.raises(files.ExposedFile, match=f"mode {mode:04o}.*chmod 600") as info:
        files.read_private(str(path))
    assert info.value.mode == mode and "hunter2" not in str(info.value)


def test_a_private_secret_is_read_up_to_its_limit(tmp_path):
    path = tmp_path / "token"
    path.write_text("0123456789")
    os.chmod(path, 0o400)
    assert files.read_private(str(path)) == "0123456789"
    assert files.read_private(str(path), limit=4) == "0123"
    with pytest.raises(FileNotFoundError):
        files.read_private(str(tmp_path / "missing"))


def test_a_claim_on_a_secret_name_is_private_and_exclusive(tmp_path):
    path = tmp_path / "peer.conf"
    old_umask = os.umask(0)
    try:
        files.create_private(str(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b""
    path.write_text("kept")
    with pytest.raises(FileExistsError):
        files.create_private(str(path))
    assert path.read_text() == "kept"
