"""The provider base's race helpers: one survivor for every racer, only a racer's own extra deleted, a conflict
adopted only when the lookup finds this deployment's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from labctl.errors import CloudError, Conflict, Transient
from labctl.providers.base import CREATE_ATTEMPTS, converge_duplicates, create_or_adopt, create_or_find, scrub


@dataclass(frozen=True)
class Item:
    id: str
    created: str
    done: bool = False


def survivor(found, created):
    deleted = []
    keep = converge_duplicates(found, created, deleted.append, ident=lambda i: i.id,
                               rank=lambda i: (not i.done, i.created))
    return keep, deleted


def test_both_racers_keep_the_same_and_each_deletes_only_its_own():
    a, b = Item("b-id", "2026-01-01T00:00:00Z"), Item("a-id", "2026-01-01T00:00:00Z")  # same second
    keep_a, deleted_a = survivor([a, b], a)
    keep_b, deleted_b = survivor([b, a], b)
    assert keep_a == keep_b == b  # a tie on time: the lowest id
    assert deleted_a == [a] and deleted_b == []


def test_a_finished_one_wins_over_an_older_unfinished_one():
    old, taken = Item("x", "2026-01-01T00:00:00Z"), Item("y", "2026-01-01T00:00:05Z", done=True)
    keep, deleted = survivor([old, taken], old)
    assert keep == taken and deleted == [old]


def test_the_created_one_counts_even_if_the_list_does_not_show_it_yet():
    mine = Item("a", "2026-01-01T00:00:00Z")
    keep, deleted = survivor([], mine)
    assert keep == mine and deleted == []
    other = Item("z", "2026-01-01T00:00:09Z")
    keep, deleted = survivor([other], mine)
    assert keep == mine and deleted == []  # the other racer's extra is not this one's to delete


def test_a_lookup_without_a_create_deletes_nothing():
    keep, deleted = survivor([Item("b", "t2"), Item("a", "t1")], None)
    assert keep.id == "a" and deleted == []
    with pytest.raises(ValueError, match="nothing to choose from"):
        survivor([], None)


def test_create_or_adopt():
    def conflict():
        raise Conflict("name taken")

    assert create_or_adopt(lambda: "new", lambda: "found") == "new"
    assert create_or_adopt(conflict, lambda: "found") == "found"
    with pytest.raises(Conflict, match="name taken"):
        create_or_adopt(conflict, lambda: None)

    def not_ours():
        raise CloudError("the name is taken by something that is not this deployment's")

    with pytest.raises(CloudError, match="not this deployment's"):
        create_or_adopt(conflict, not_ours)

    def other_error():
        raise CloudError("boom")

    with pytest.raises(CloudError, match="boom"):  # only a conflict is adopted
        create_or_adopt(other_error, lambda: "found")


def test_create_or_find_looks_before_sending_again_after_a_lost_answer():
    cloud: list[str] = []

    def create_lost() -> str:  # the cloud made it, the answer was lost
        cloud.append("made")
        raise Transient("read timeout")

    assert create_or_find(create_lost, lambda: cloud[0] if cloud else None) == "made" and cloud == ["made"]

    sent: list[int] = []

    def create_not_made() -> str:  # nothing was made: the one resend is right
        sent.append(1)
        if len(sent) == 1:
            raise Transient("connection reset")
        return "made"

    assert create_or_find(create_not_made, lambda: None) == "made" and len(sent) == 2

    def fails(times: int) -> Callable[[], str]:  # server errors in a row, nothing made, then it works
        def create() -> str:
            sent.append(1)
            if len(sent) <= times:
                raise Transient("500 Internal Server Error")
            return "made"
        return create

    sent.clear()
    assert create_or_find(fails(CREATE_ATTEMPTS - 1), lambda: None) == "made" and len(sent) == CREATE_ATTEMPTS
    sent.clear()
    with pytest.raises(Transient):
        create_or_find(fails(CREATE_ATTEMPTS), lambda: None)  # every send failed: the engine's rerun finds out
    assert len(sent) == CREATE_ATTEMPTS
    cloud.clear()
    with pytest.raises(Transient):
        create_or_find(create_lost, lambda: None)  # lost every time and never listed: the rerun finds them


def test_scrub_masks_registered_secrets_on_one_line():
    from labctl import redact

    redact.register_secret("s3cr3t-value-for-scrub")
    exc = scrub(CloudError("site: echo s3cr3t-value-for-scrub\nsecond line\x1b[31m"))
    assert type(exc) is CloudError
    assert str(exc) == f"site: echo {redact.MASK} second line[31m"
