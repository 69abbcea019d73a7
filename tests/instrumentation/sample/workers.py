"""Long-lived tasks started lazily inside a wrapped call: they copy the call's context."""

import asyncio


class Manager:
    async def send_to_user(self, user_id, message):
        return 0


class FlushingEmitter:
    """Queues events; a flusher task, started by the first emit, dispatches them."""

    def __init__(self, manager):
        self.manager = manager
        self.queue = asyncio.Queue()
        self.task = None

    async def notify_step(self, run_id, user_id):
        if self.task is None:
            self.task = asyncio.create_task(self._flush())
        await self.queue.put((user_id, {"type": "step", "run_id": run_id}))

    async def _flush(self):
        while True:
            user, message = await self.queue.get()
            await self.manager.send_to_user(user, message)
            self.queue.task_done()


class Step:
    async def execute_step(self, run_id):
        return run_id


class WorkerEngine:
    """Hands runs to a worker task that the first execution starts."""

    def __init__(self):
        self.worker = None
        self.queue = asyncio.Queue()

    async def execute(self, run_id):
        if self.worker is None:
            self.worker = asyncio.create_task(self._work())
        await self.queue.put(run_id)

    async def _work(self):
        while True:
            run_id = await self.queue.get()
            await Step().execute_step(run_id)
            self.queue.task_done()
