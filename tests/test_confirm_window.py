"""The publisher-confirm window's rules, message by message, with no broker and no socket.

The same rules run against a real RabbitMQ in test_broker_reconnect.py (nacks from a
full reject-publish queue, lost connections) and test_publish_test_driver.py.
"""

from __future__ import annotations

import threading

from virtpub.amqp.window import NACK_CAREFUL_S, ConfirmWindow
from virtpub.contract.envelope import OutgoingMessage
from virtpub.testing import ManualClock


def message(sequence: int, received_at: float = 0.0) -> OutgoingMessage:
    return OutgoingMessage(
        sequence, f"id-{sequence}", "v1.h.domain.started", "t", 0, b"", b"{}", received_at
    )


def window(size: int = 3) -> tuple[ConfirmWindow, ManualClock]:
    clock = ManualClock()
    return ConfirmWindow(size, monotonic=lambda: clock.monotonic), clock


def sequences(messages: list[OutgoingMessage]) -> list[int]:
    return [m.sequence for m in messages]


def test_take_fills_the_window_and_tags_from_one() -> None:
    w, _ = window(size=3)
    w.submit(message(n) for n in range(1, 6))
    assert sequences(w.take()) == [1, 2, 3]
    assert w.take() == []  # full: three in flight
    assert w.awaiting == 3 and w.published == 3 and w.unconfirmed() == 5
    assert sequences(w.ack(2, multiple=True)) == [1, 2]
    assert sequences(w.take()) == [4, 5]
    assert sequences(w.ack(5, multiple=True)) == [3, 4, 5]
    assert w.confirmed == 5 and w.unconfirmed() == 0


def test_a_single_ack_out_of_order_settles_only_its_message() -> None:
    w, _ = window()
    w.submit(message(n) for n in (1, 2, 3))
    w.take()
    assert sequences(w.ack(2, multiple=False)) == [2]
    assert sequences(w.ack(1, multiple=False)) == [1]
    assert w.ack(9, multiple=False) == []  # not in flight: nothing settles
    assert w.awaiting == 1 and w.confirmed == 2


def test_tags_restart_on_a_new_channel_and_requeue_keeps_the_order() -> None:
    w, _ = window(size=2)
    w.submit(message(n) for n in (1, 2, 3))
    w.take()
    w.requeue()  # the channel is gone: both in-flight messages go back in front
    assert w.awaiting == 0 and w.unconfirmed() == 3
    w.new_channel()
    assert sequences(w.take()) == [1, 2]
    assert sequences(w.ack(1, multiple=False)) == [1]  # tag 1 is message 1 again


def test_a_refused_message_waits_for_the_confirms_due_before_it_then_goes_first() -> None:
    w, _ = window(size=3)
    w.submit(message(n) for n in (1, 2, 3, 4))
    w.take()
    assert w.nack(2, multiple=False) == 1 and w.nacked == 1
    assert w.resend_refused() == 0  # messages 1 and 3 may still be taken or refused
    assert w.take() == []  # nothing is published while a refusal waits
    w.ack(1, multiple=False)
    assert w.resend_refused() == 0
    w.ack(3, multiple=False)
    assert w.resend_refused() == 1 and w.nack_streak == 1
    assert w.unconfirmed() == 2
    w.new_channel()
    assert sequences(w.take()) == [2]  # careful: one at a time, the refused one first


def test_after_a_nack_one_message_at_a_time_until_careful_time_has_passed() -> None:
    w, clock = window(size=3)
    w.submit(message(n) for n in range(1, 6))
    w.take()
    w.nack(3, multiple=True)
    assert w.resend_refused() == 3
    assert sequences(w.take()) == [1]  # the same channel: its tags go on, 1 is now tag 4
    assert w.take() == []
    assert sequences(w.ack(4, multiple=False)) == [1]
    assert w.nack_streak == 0  # an ack ends the streak
    assert sequences(w.take()) == [2]
    w.ack(5, multiple=False)
    clock.advance(NACK_CAREFUL_S)
    assert sequences(w.take()) == [3, 4, 5]


def test_refusals_in_a_row_count_up_the_streak() -> None:
    w, _ = window(size=1)
    w.submit([message(1)])
    for streak in (1, 2, 3):
        w.take()
        w.nack(streak, multiple=False)
        w.resend_refused()
        assert w.nack_streak == streak


def test_a_nack_of_no_message_in_flight_refuses_nothing() -> None:
    w, _ = window()
    w.submit([message(1)])
    w.take()
    assert w.nack(7, multiple=False) == 0
    assert w.nacked == 0 and w.resend_refused() == 0


def test_withdraw_takes_back_only_what_is_not_published() -> None:
    w, _ = window(size=2)
    w.submit(message(n) for n in (1, 2, 3, 4))
    w.take()
    assert w.withdraw() == 3
    assert w.withdraw() is None
    assert w.unconfirmed() == 2  # the two in flight stay until confirmed


def test_overdue_counts_from_the_last_publish_or_confirm() -> None:
    w, clock = window(size=2)
    assert w.overdue_s() == 0.0
    w.submit(message(n) for n in (1, 2, 3))
    w.take()
    clock.advance(4)
    assert w.overdue_s() == 4
    w.ack(1, multiple=False)
    assert w.overdue_s() == 0
    clock.advance(2)
    w.restart_stall_clock()  # the broker unblocked publishing
    assert w.overdue_s() == 0
    w.ack(2, multiple=False)
    assert w.overdue_s() == 0.0  # nothing in flight


def test_in_flight_finds_a_returned_message_by_id() -> None:
    w, _ = window()
    w.submit(message(n) for n in (1, 2))
    assert w.in_flight("id-1") is None  # not published yet
    w.take()
    found = w.in_flight("id-2")
    assert found is not None and found.sequence == 2


def test_ack_observes_the_latency_of_received_messages_only() -> None:
    w, _ = window()
    w.submit([message(1, received_at=1.0), message(2)])  # 2 was read back from the spool
    w.take()
    w.ack(2, multiple=True)
    assert sum(w.latency.counts) == 1


def test_wait_settled_returns_when_the_last_confirm_comes_from_another_thread() -> None:
    w, _ = window()
    w.submit([message(1)])
    w.take()
    assert not w.wait_settled(0.01, given_up=lambda: False)

    def confirm() -> None:
        w.ack(1, multiple=False)
        w.wake_waiters()

    threading.Timer(0.05, confirm).start()
    assert w.wait_settled(5, given_up=lambda: False)


def test_wait_settled_is_false_once_given_up() -> None:
    w, _ = window()
    w.submit([message(1)])
    assert not w.wait_settled(5, given_up=lambda: True)
