"""User-facing errors: each names the file, the field and the fix, and the CLI prints it without a traceback."""

import errno


class DenseSSLError(Exception):
    """An error caused by the user's input (config, data, checkpoint), not by a bug in densessl."""


class ConfigError(DenseSSLError):
    pass


class DataError(DenseSSLError):
    pass


class CheckpointError(DenseSSLError):
    pass


_OS_FIXES: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", "make the folder writable for your user, or set results_dir in config.yaml "
                                        "to a folder you can write"),
    errno.EPERM: ("operation not permitted", "make the folder writable for your user, or set results_dir in "
                                             "config.yaml to a folder you can write"),
    errno.EROFS: ("read-only file system", "set results_dir in config.yaml to a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free disk space (or your quota) there, or set results_dir in "
                                                  "config.yaml to a larger disk, then re-run to continue"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota, or set results_dir in config.yaml to "
                                          "another disk, then re-run to continue"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "remove or rename that file, or choose "
                                                                  "another results_dir"),
    errno.ENOENT: ("no such file or folder", "check the path in config.yaml, or re-run the stage that writes it"),
    errno.EISDIR: ("is a folder, not a file", "remove the folder or choose another path"),
    errno.EIO: ("input/output error from the device", "check the disk or network file system, then re-run"),
}


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: the file, what happened and the fix (used by the CLI's top-level handler)."""
    where = exc.filename if exc.filename is not None else "(file not named by the system)"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    what, fix = _OS_FIXES.get(exc.errno or -1, (exc.strerror or str(exc), "check the path and re-run"))
    return f"{where}: {what}; {fix}"
