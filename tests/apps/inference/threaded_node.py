"""A shard server in a thread of the test process (no process start-up): ``die`` drops its connections,
``freeze`` stops it answering with its connections left open (a hung program)."""

from __future__ import annotations

import threading

import zmq

from testbed.apps.inference.local_chain import free_port
from testbed.apps.inference.shard_server import ShardServer
from testbed.model.shard import Shard


class Node:
    def __init__(self, shard: Shard, next_addr: str | None, **kw) -> None:
        self.addr = f"tcp://127.0.0.1:{free_port()}"
        self.server = ShardServer(shard, self.addr, next_addr, ctx=zmq.Context.instance(), **kw)
        self.frozen = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve()
        finally:
            if not self.frozen:
                self.server.close()

    def die(self) -> None:
        self.server.running = False
        self.thread.join(5)

    def freeze(self) -> None:
        self.frozen = True
        self.die()
