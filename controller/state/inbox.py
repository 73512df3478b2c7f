"""Commands for a node's owner from the other controllers, through Redis.

Any controller takes API commands for any call, but the controller that owns the call's
media node carries them out (it holds the call's media in memory and hears the node's
events). A request is pushed to the node's inbox list (`cf:inbox:{node}`) with a deadline;
the owner pops it (BLPOP), carries it out and pushes the answer to the request's own reply
list, which the asking controller waits on. A request nobody picked up before its deadline
is dropped by whoever finds it (an owner that died leaves its successor nothing stale to do)."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from controller.state.batch import Batcher
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.state")

PREFIX = "cf"
KEEP_S = 30  # an inbox or a reply nobody reads expires
POP_WAIT_S = 1.0


def inbox_key(node: str) -> str:
    return f"{PREFIX}:inbox:{{{node}}}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}:reply:{{{request_id}}}"


class InboxTimeout(Exception):
    """Nobody answered in time (the node has no owner, or it is busy or dying)."""


class NodeInbox:
    def __init__(self, batch: Batcher, blocking: Any):
        self.batch = batch  # for pushes
        self.blocking = blocking  # a redis-py client: BLPOP holds a connection while it waits

    async def ask(self, node: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send `request` to the owner of `node` and return its answer; InboxTimeout if none came."""
        request_id = uuid.uuid4().hex
        message = json.dumps({**request, "id": request_id, "deadline_ms": now_ms() + int(timeout_s * 1000)})
        await self.batch.run([("RPUSH", inbox_key(node), message), ("EXPIRE", inbox_key(node), KEEP_S)])
        popped = await self.blocking.blpop([reply_key(request_id)], timeout=timeout_s)
        if popped is None:
            raise InboxTimeout(f"the owner of media node {node} did not answer within {timeout_s:.0f}s")
        try:
            answer = json.loads(popped[1])
        except (ValueError, TypeError):
            answer = None
        if not isinstance(answer, dict):
            raise InboxTimeout(f"the owner of media node {node} answered garbage")
        return answer

    async def serve(self, node: str, handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        """Carry out `node`'s requests (each in its own task) until cancelled."""
        tasks: set[asyncio.Task] = set()
        unreachable = False
        try:
            while True:
                try:
                    popped = await self.blocking.blpop([inbox_key(node)], timeout=POP_WAIT_S)
                except (RedisError, OSError) as exc:
                    if not unreachable:
                        log.warning("media node %s: its command inbox is unreachable (%s); retrying", node, exc)
                    unreachable = True
                    await asyncio.sleep(POP_WAIT_S)
                    continue
                unreachable = False
                if popped is None:
                    continue
                try:
                    request = json.loads(popped[1])
                except (ValueError, TypeError):
                    request = None
                if not isinstance(request, dict) or not isinstance(request.get("id"), str):
                    log.warning("media node %s: ignored a garbage inbox message", node)
                    continue
                if not isinstance(request.get("deadline_ms"), int) or request["deadline_ms"] < now_ms():
                    log.warning("media node %s: dropped a request past its deadline", node)
                    continue
                task = asyncio.create_task(self._answer(request, handle))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    async def _answer(self, request: dict[str, Any], handle) -> None:
        try:
            answer = await handle(request)
        except Exception:  # the asker must hear something
            log.exception("inbox request failed")
            answer = {"status": 500, "body": {"error": {"status": 500, "message": "internal error"}}}
        try:
            await self.batch.run([("RPUSH", reply_key(request["id"]), json.dumps(answer)),
                                  ("EXPIRE", reply_key(request["id"]), KEEP_S)])
        except RedisError as exc:
            log.error("could not answer an inbox request: %s", exc)
