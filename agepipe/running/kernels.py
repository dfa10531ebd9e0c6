"""Notebook kernels that never outlive the run that started them.

jupyter_client starts a kernel in a session of its own (an interrupt must reach the kernel's whole
process group, not its parent), so killing the run's process group with kill -9 leaves the kernel
alive until its parent poller notices, a few tenths of a second later and longer under load. Meanwhile
a kernel still starting up recreates its connection file's folder, the run's scratch folder, after the
next run has removed it. On Linux the kernel is asked for SIGKILL the moment its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from jupyter_client.manager import AsyncKernelManager

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def parent_death_signal():
    """A `preexec_fn` for subprocess.Popen: the child gets SIGKILL when this process dies (Linux's
    prctl(PR_SET_PDEATHSIG)), or None elsewhere. The C function is looked up here, before the fork: a
    forked child of a threaded process must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return die_with_parent


class ParentBoundKernelManager(AsyncKernelManager):
    """nbclient's kernel manager, with kernels that die with the process that started them."""

    async def start_kernel(self, **kw):
        preexec = parent_death_signal()
        if preexec is not None:
            kw.setdefault("preexec_fn", preexec)
        await super().start_kernel(**kw)
