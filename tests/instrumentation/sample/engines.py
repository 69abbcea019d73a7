"""Test backend: engines of every method kind (sync, async, generator, async generator, class/static)."""

from __future__ import annotations


class UserContext:
    def __init__(self, user_id: str, run_id: str = "run-1", thread_id: str = "thread-1") -> None:
        self.user_id = user_id
        self.run_id = run_id
        self.thread_id = thread_id


class BaseEngine:
    """Not listed itself: its methods reach listed subclasses by inheritance."""

    def __init__(self, user_context: UserContext | None = None) -> None:
        self.user_context = user_context

    def execute_pipeline(self, steps: list, context: UserContext, user_context: UserContext | None = None) -> int:
        """Run steps."""
        return len(steps)


class UserExecutionEngine(BaseEngine):
    def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
        """Run one agent."""
        return f"done:{context.run_id}"

    async def execute_async(self, context: UserContext, *, delay: float = 0.0) -> str:
        return f"async:{context.run_id}"

    def stream_steps(self, context: UserContext, count: int = 3):
        for index in range(count):
            yield index

    async def astream_steps(self, context: UserContext, count: int = 3):
        for index in range(count):
            yield index

    @classmethod
    def build(cls, context: UserContext) -> "UserExecutionEngine":
        return cls(context)

    @staticmethod
    def validate(context: UserContext) -> bool:
        return context.user_id is not None

    def fail(self, context: UserContext) -> None:
        raise ValueError("engine failure")


class RequestScopedExecutionEngine(UserExecutionEngine):
    """A listed subclass that overrides one method and delegates to the parent (nested)."""

    def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
        return super().execute_agent(context, user_context)


class IsolatedExecutionEngine(BaseEngine):
    """Retired fallback."""

    def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
        return "isolated"


class ExecutionEngine:
    """An alias that redirects to the canonical engine (the call below is nested)."""

    def __init__(self, user_context: UserContext | None = None) -> None:
        self.user_context = user_context
        self._target = UserExecutionEngine(user_context)

    def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
        return self._target.execute_agent(context, user_context)


class SlotEngine:
    """No __dict__ and no weakref: gets no instance token, must still work."""

    __slots__ = ("user_context",)

    def __init__(self, user_context: UserContext | None = None) -> None:
        self.user_context = user_context

    def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
        return "slots"


class BrokenContext:
    """A context whose user_id property raises: extraction fails, the call must not."""

    run_id = "run-broken"
    thread_id = "thread-broken"

    @property
    def user_id(self) -> str:
        raise RuntimeError("property exploded")
