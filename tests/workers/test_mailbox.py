"""The worker outbox behind the controller's long-polls and streams."""

from __future__ import annotations

import asyncio
import threading

from workers.mailbox import Mailbox


def test_since_drops_acknowledged_items_and_waits_for_new_ones():
    async def go():
        box: Mailbox[int] = Mailbox()
        box.put([1, 2, 3])
        assert await box.since(0, 0.0) == ([1, 2, 3], 3)
        assert await box.since(2, 0.0) == ([3], 3)  # 1, 2 acknowledged: dropped
        threading.Timer(0.05, box.put, args=([4],)).start()  # from another thread
        assert await box.since(3, 1.0) == ([4], 4)
        assert await box.since(4, 0.05) == ([], 4)  # timed out
        assert await box.since(1 << 62, 0.0) == ([], 4)  # skip everything
    asyncio.run(go())


def test_follow_yields_batches_without_dropping_and_keeps_the_last_items():
    async def go():
        box: Mailbox[int] = Mailbox(keep=4)
        box.put([1, 2])
        stream = box.follow(0, idle_s=0.05)
        assert await stream.__anext__() == ([1, 2], 2)
        threading.Timer(0.02, box.put, args=([3, 4, 5],)).start()
        assert await stream.__anext__() == ([3, 4, 5], 5)
        assert await stream.__anext__() == ([], 5)  # idle: an empty batch
        assert await box.since(0, 0.0) == ([2, 3, 4, 5], 5)  # kept the last 4, none dropped
        box.put([6, 7])
        assert await box.since(0, 0.0) == ([4, 5, 6, 7], 7)
        await stream.aclose()
    asyncio.run(go())
