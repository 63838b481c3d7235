"""This machine and its processes: used to tell that the owner of a job or a temp file is gone."""
from __future__ import annotations

import os
import socket

HOSTNAME = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
