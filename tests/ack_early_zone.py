"""A deliberately broken snapperd: acks ``mirrored`` before the mirror holds the snapshot.

Run by the soak test that must catch it (``python -m tests.ack_early_zone``,
through ``SoakConfig.zone_module``). The product has no such switch: the
fault lives here, in a subclass of the command handler.
"""

from __future__ import annotations

import sys

from snapper_zone.daemon.main import main
from snapper_zone.daemon.service import Service
from snapper_zone.transfer.store import VmSnapshot
from snapper_zone.wire.protocol import Commit


class AckEarlyService(Service):
    async def mirrored(self, cmd: Commit, done: VmSnapshot) -> tuple[str | None, str | None]:
        rep = self.zone.replicator
        assert rep is not None
        early = await rep.links.partner(cmd.vm)
        if early is None:
            return await super().mirrored(cmd, done)
        return early.uuid, None  # claimed, never checked


if __name__ == "__main__":
    sys.exit(main(service=AckEarlyService))
