import threading

from targetvirt.clock import FakeClock


def test_fake_clock_wakes_waiter_on_advance() -> None:
    clock = FakeClock()
    cond = threading.Condition()
    deadline = clock.now() + 5.0
    woke = threading.Event()

    def waiter() -> None:
        with cond:
            while clock.now() < deadline:
                clock.wait(cond, deadline)
        woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not woke.wait(0.2)  # real time passes, fake time does not
    clock.advance(5.0)
    assert woke.wait(5.0)
    t.join()
