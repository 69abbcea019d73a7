import pytest

from sidecar.alerting import TokenBucket


class FakeClock:
    """The bucket's clock, set by the test: its refills take tens of seconds of real time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_up_to_the_rate_then_waits():
    clock = FakeClock()
    bucket = TokenBucket(3, clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(20.0)  # 3/min: one token every 20 s


def test_tokens_refill_with_time_up_to_the_capacity():
    clock = FakeClock()
    bucket = TokenBucket(60, clock)
    for _ in range(60):
        assert bucket.try_take() == 0.0
    clock.now += 2.0
    assert [bucket.try_take() for _ in range(3)][:2] == [0.0, 0.0]
    clock.now += 3600
    assert sum(bucket.try_take() == 0.0 for _ in range(100)) == 60


def test_rate_must_be_positive():
    with pytest.raises(ValueError, match="rate_per_minute"):
        TokenBucket(0)
