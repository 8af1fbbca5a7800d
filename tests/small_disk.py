"""A disk that fills up, for the disk-full tests.

Where the test may mount (root, as in CI): a real tmpfs of a given size under tmp_path, so every
writer (Python, safetensors' Rust, torch's C++, pyarrow) meets a real ENOSPC at its own write call;
`fill()` writes a filler file that leaves only a few KiB free, `grow()` remounts it bigger (the user
freeing space). Where mounting is not permitted (or FINMERGE_TEST_NO_MOUNT=1): the folder is an
ordinary one and the write calls a test names with `inject()` raise OSError(ENOSPC) for paths under
it once the disk is "full". Each test says which writers it targets, so both modes test the same
fault; `mode` says which one ran (also recorded as the test's `disk` property).
"""

import errno
import os
import subprocess
from typing import Callable, Optional

import pytest


def _run(*args: str) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SmallDisk:
    def __init__(self, folder: str, size: int):
        self.folder = folder
        os.makedirs(folder)
        self.mounted = os.environ.get("FINMERGE_TEST_NO_MOUNT") != "1" and \
            _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder)
        self.mode = "tmpfs" if self.mounted else "injected ENOSPC"
        self.full = False  # injected mode: whether the named writers fail now

    def fill(self, leave: int = 8192) -> None:
        """Use up the space, leaving `leave` bytes (less than any weight file here)."""
        self.full = True
        if not self.mounted:
            return
        free = os.statvfs(self.folder)
        spare = free.f_bavail * free.f_frsize - leave
        if spare > 0:
            with open(os.path.join(self.folder, "filler"), "wb") as handle:
                handle.write(b"\0" * spare)

    def grow(self, size: int = 64 << 20) -> None:
        """The user frees space: a bigger disk (the filler stays)."""
        self.full = False
        if self.mounted:
            assert _run("mount", "-o", f"remount,size={size}", self.folder), "tmpfs remount failed"

    def inject(self, monkeypatch, owner, name: str, path_of: Callable[..., Optional[str]]) -> None:
        """Injected mode only: `owner.name` raises ENOSPC for a path under the folder while full."""
        if self.mounted:
            return
        real = getattr(owner, name)
        disk = self

        def full_disk_write(*args, **kwargs):
            path = path_of(*args, **kwargs)
            if disk.full and path is not None and os.path.abspath(str(path)).startswith(disk.folder + os.sep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, full_disk_write)

    def unmount(self) -> None:
        if self.mounted and not _run("umount", self.folder):
            _run("umount", "-l", self.folder)  # something still holds a file open: detach it anyway
        self.mounted = False


@pytest.fixture
def small_disk(tmp_path, record_property):
    """small_disk(size) -> SmallDisk under tmp_path; always unmounted at teardown, pass or fail."""
    disks = []

    def make(size: int = 1 << 20, name: str = "disk") -> SmallDisk:
        disk = SmallDisk(str(tmp_path / name), size)
        disks.append(disk)
        record_property("disk", disk.mode)
        return disk

    try:
        yield make
    finally:
        for disk in disks:
            disk.unmount()
