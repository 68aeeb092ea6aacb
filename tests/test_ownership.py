"""streams.ownership.owned: table writers wait out a rebalance, then see what they own."""
import asyncio

from streams.ownership import owned


class FakeConsumer:
    def __init__(self, assignment):
        self.assignment_now = set(assignment)

    def assignment(self):
        return self.assignment_now


class FakeApp:
    def __init__(self):
        self.rebalancing = False
        self.consumer = FakeConsumer({("events", 0), ("events", 1)})


def test_returns_the_assignment_when_no_rebalance_runs():
    assert asyncio.run(owned(FakeApp())) == {("events", 0), ("events", 1)}


def test_waits_for_the_rebalance_and_returns_the_new_assignment():
    app = FakeApp()
    app.rebalancing = True

    async def rebalance():
        await asyncio.sleep(0.05)
        app.consumer.assignment_now = {("events", 1)}   # partition 0 went to another worker
        app.rebalancing = False

    async def main():
        task = asyncio.create_task(rebalance())
        result = await owned(app, poll_s=0.005)
        await task
        return result

    assert asyncio.run(main()) == {("events", 1)}
