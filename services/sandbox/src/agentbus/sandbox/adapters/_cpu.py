"""CPU time of a run: the container cgroup's counter read before and after it.

One container serves one task, so all of the container's CPU is the task's. The
counter is read on the host (:mod:`.cgroup`) or, when the host's cgroups are out of
this service's sight, inside the container (``domain.CPU_USAGE_ARGV``, one exec per
reading).
"""

from __future__ import annotations

import contextlib

import aiodocker
import aiohttp
import structlog

from . import cgroup
from ._box import Box
from ._exec import cpu_usage_inside

log = structlog.get_logger(__name__)


class CpuMeter:
    """Reads the CPU counters of one replica's boxes."""

    def __init__(self) -> None:
        self._inside_noted = False

    async def locate(self, box: Box) -> None:
        """Find the box's CPU counter on the host, once (:mod:`.cgroup`)."""
        if box.cpu_located:
            return
        try:
            info = await box.container.show()
            container_id, pid = str(info["Id"]), int(info["State"]["Pid"])
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("cannot inspect the sandbox to find its CPU counter", error=str(exc))
            return  # looked for again at the next reading
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("unexpected sandbox inspect answer", error=repr(exc))
            container_id, pid = "", 0
        box.cpu = cgroup.locate(container_id, pid)
        box.cpu_located = True
        if box.cpu is None and not self._inside_noted:
            self._inside_noted = True
            log.info(
                "sandbox cgroups are not visible from this service; reading CPU time "
                "inside each sandbox (one exec per reading)"
            )

    async def usage(self, box: Box) -> int | None:
        """The CPU time the box's container used so far, in microseconds; None if it
        cannot be read (container gone, engine trouble). Never raises."""
        await self.locate(box)
        usage: int | None = None
        if box.cpu is not None:
            with contextlib.suppress(OSError, ValueError):  # gone: removed meanwhile
                usage = box.cpu.read_usec()
        else:
            usage = await cpu_usage_inside(box.container)
        if usage is not None:
            box.cpu_seen = usage
        return usage

    async def since(self, box: Box, before: int | None) -> float:
        """CPU seconds the box's container used since its counter read ``before``.

        If the container is gone by now (the workspace guard replaced it), the last
        reading of it counts: the guard takes one just before removing it.
        """
        after = await self.usage(box)
        if after is None:
            log.warning("cannot read the sandbox's CPU time after the run; using its last reading")
            after = box.cpu_seen
        if before is None or after is None:
            log.warning("cannot read the sandbox's CPU time before the run; reporting 0")
            return 0.0
        return max(0, after - before) / 1e6
