"""POSIX behaviour of a real tierfs mount, one behaviour per test."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.conftest import Mount

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    rc = _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_write_read_and_remount(fs: Mount) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (fs.mnt / "f").write_bytes(data)
    assert (fs.mnt / "f").read_bytes() == data
    fs.remount()
    assert (fs.mnt / "f").read_bytes() == data


def test_sparse_file_larger_than_4gib(fs: Mount) -> None:
    path = fs.mnt / "sparse"
    offset = 5 * 1024**3 + 123
    with open(path, "wb") as f:
        f.seek(offset)
        f.write(b"tail")
    st = path.stat()
    assert st.st_size == offset + 4
    assert st.st_blocks * 512 < 1024 * 1024, "a hole must not be allocated"
    with open(path, "rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(offset - 2)
        assert f.read() == b"\0\0tail"
    fs.remount()
    assert (fs.mnt / "sparse").stat().st_size == offset + 4


def test_truncate_and_extend_reads_zeros(fs: Mount) -> None:
    path = fs.mnt / "t"
    path.write_bytes(b"x" * 10000)
    os.truncate(path, 100)
    os.truncate(path, 5000)
    assert path.read_bytes() == b"x" * 100 + bytes(4900)


def test_append_and_trunc_flags(fs: Mount) -> None:
    path = fs.mnt / "log"
    path.write_bytes(b"one\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"two\n")
    os.close(fd)
    assert path.read_bytes() == b"one\ntwo\n"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.stat().st_size == 0


def test_rmdir_non_empty_and_unlink_dir(fs: Mount) -> None:
    d = fs.mnt / "d"
    d.mkdir()
    (d / "f").write_text("x")
    with pytest.raises(OSError) as exc:
        d.rmdir()
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as exc:
        os.unlink(d)
    assert exc.value.errno in (errno.EISDIR, errno.EPERM)


def test_rename_noreplace_and_exchange(fs: Mount) -> None:
    a, b = fs.mnt / "a", fs.mnt / "b"
    a.write_text("A")
    b.write_text("B")
    with pytest.raises(OSError) as exc:
        renameat2(a, b, RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    renameat2(a, b, RENAME_EXCHANGE)
    assert a.read_text() == "B" and b.read_text() == "A"
    with pytest.raises(OSError) as exc:
        renameat2(a, fs.mnt / "missing", RENAME_EXCHANGE)
    assert exc.value.errno == errno.ENOENT


def test_rename_directory_across_parents_and_into_itself(fs: Mount) -> None:
    (fs.mnt / "p1" / "d" / "sub").mkdir(parents=True)
    (fs.mnt / "p2").mkdir()
    os.rename(fs.mnt / "p1" / "d", fs.mnt / "p2" / "d")
    assert (fs.mnt / "p2" / "d" / "sub").is_dir()
    assert os.stat(fs.mnt / "p1").st_nlink == 2
    assert os.stat(fs.mnt / "p2").st_nlink == 3
    with pytest.raises(OSError) as exc:
        os.rename(fs.mnt / "p2", fs.mnt / "p2" / "d" / "sub" / "x")
    assert exc.value.errno == errno.EINVAL
    assert os.path.realpath(fs.mnt / "p2" / "d" / "sub" / "..") == str(fs.mnt / "p2" / "d")


def test_rename_replaces_file_and_empty_directory(fs: Mount) -> None:
    (fs.mnt / "src").write_text("new")
    (fs.mnt / "dst").write_text("old")
    os.rename(fs.mnt / "src", fs.mnt / "dst")
    assert (fs.mnt / "dst").read_text() == "new"
    (fs.mnt / "d1").mkdir()
    (fs.mnt / "d2").mkdir()
    (fs.mnt / "d2" / "x").write_text("x")
    with pytest.raises(OSError) as exc:
        os.rename(fs.mnt / "d1", fs.mnt / "d2")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(fs.mnt / "d2" / "x")
    os.rename(fs.mnt / "d1", fs.mnt / "d2")
    assert sorted(os.listdir(fs.mnt)) == ["d2", "dst"]


def test_hardlinks_share_data_and_count(fs: Mount) -> None:
    a = fs.mnt / "a"
    a.write_text("shared")
    os.link(a, fs.mnt / "b")
    assert a.stat().st_nlink == 2
    assert a.stat().st_ino == (fs.mnt / "b").stat().st_ino
    with open(fs.mnt / "b", "a") as f:
        f.write("!")
    assert a.read_text() == "shared!"
    a.unlink()
    assert (fs.mnt / "b").stat().st_nlink == 1


def test_symlink_and_readlink(fs: Mount) -> None:
    target = "some/where/é ü"
    os.symlink(target, fs.mnt / "l")
    assert os.readlink(fs.mnt / "l") == target
    assert stat.S_ISLNK(os.lstat(fs.mnt / "l").st_mode)
    assert os.lstat(fs.mnt / "l").st_size == len(target.encode())


def test_mknod_fifo_socket_and_devices_refused(fs: Mount) -> None:
    os.mkfifo(fs.mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(fs.mnt / "fifo").st_mode)
    os.mknod(fs.mnt / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.stat(fs.mnt / "sock").st_mode)
    with pytest.raises(OSError) as exc:
        os.mknod(fs.mnt / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert exc.value.errno == errno.EPERM


def test_unix_socket_bind(fs: Mount) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(fs.mnt / "s.sock"))
    assert stat.S_ISSOCK(os.stat(fs.mnt / "s.sock").st_mode)


def test_chmod_chown_utimens_nanoseconds(fs: Mount) -> None:
    path = fs.mnt / "f"
    path.write_text("x")
    os.chmod(path, 0o640)
    os.chown(path, 1234, 5678)
    os.utime(path, ns=(1_000_000_001, 2_000_000_003))
    fs.remount()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_003)


def test_xattrs(fs: Mount) -> None:
    path = fs.mnt / "f"
    path.write_text("x")
    os.setxattr(path, "user.a", b"1")
    os.setxattr(path, "user.b", b"\0" * 1000)
    assert sorted(os.listxattr(path)) == ["user.a", "user.b"]
    assert os.getxattr(path, "user.b") == b"\0" * 1000
    os.removexattr(path, "user.a")
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.a")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(path, "user.b", b"2", os.XATTR_CREATE)
    assert exc.value.errno == errno.EEXIST
    fs.remount()
    assert os.listxattr(path) == ["user.b"]


def test_unlinked_open_file_stays_readable_then_goes(fs: Mount) -> None:
    path = fs.mnt / "tmp"
    path.write_bytes(b"still here")
    with open(path, "rb") as f:
        path.unlink()
        assert not path.exists()
        assert f.read() == b"still here"
    fs.umount()
    staging = list((fs.data / "staging").rglob("*"))
    assert not [p for p in staging if p.is_file()], "staging file of a deleted inode remains"


def test_readdir_offsets_stable_while_directory_changes(fs: Mount) -> None:
    d = fs.mnt / "d"
    d.mkdir()
    names = {f"f{i:04d}" for i in range(600)}
    for n in names:
        (d / n).touch()
    seen: list[str] = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 10:
                for n in sorted(names)[:50]:
                    if n not in seen:
                        (d / n).unlink()
                        names.discard(n)
                (d / "late").touch()
    assert len(seen) == len(set(seen)), "an entry was reported twice"
    assert names <= set(seen), "an entry that existed throughout was skipped"


def test_statfs_reports_data_directory_capacity(fs: Mount) -> None:
    mine = os.statvfs(fs.mnt)
    under = os.statvfs(fs.data)
    assert mine.f_namemax == 255
    assert abs(mine.f_blocks * mine.f_frsize - under.f_blocks * under.f_frsize) < 1 << 20


def test_name_too_long(fs: Mount) -> None:
    with pytest.raises(OSError) as exc:
        (fs.mnt / ("x" * 256)).touch()
    assert exc.value.errno == errno.ENAMETOOLONG


def test_permissions_enforced_for_other_users(fs: Mount) -> None:
    path = fs.mnt / "private"
    path.write_text("secret")
    os.chmod(path, 0o600)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                path.read_text()
            except PermissionError:
                os._exit(0)
            os._exit(1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
