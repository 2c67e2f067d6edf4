"""What the caller's block raises inside open_sender / open_receiver comes
out exactly as raised: a lone exception as itself (not wrapped by the
nursery), and a group the caller raised (or a nursery of the caller's own
produced) as that very group, neither unwrapped nor wrapped again."""

from __future__ import annotations

import pytest
import trio

from mcast_trio import open_receiver, open_sender
from mcast_trio.testing import MemoryNetwork

GROUP, PORT = "239.255.90.1", 5990


@pytest.fixture(params=["open_sender", "open_receiver"])
def opener(request):
    net = MemoryNetwork(seed=1)
    if request.param == "open_sender":
        return lambda: open_sender(GROUP, PORT, network=net)
    return lambda: open_receiver(GROUP, PORT, network=net)


async def test_a_lone_exception_comes_out_as_itself(opener):
    mine = KeyError("mine")
    with pytest.raises(KeyError) as info:
        async with opener():
            raise mine
    assert info.value is mine


async def test_a_group_of_one_raised_by_the_caller_stays_that_group(opener):
    mine = ExceptionGroup("the caller's own group", [KeyError("inner")])
    with pytest.raises(ExceptionGroup) as info:
        async with opener():
            raise mine
    assert info.value is mine


async def test_a_group_from_the_callers_own_nursery_is_not_wrapped_again(opener):
    async def fail(exc):
        raise exc

    with pytest.raises(ExceptionGroup) as info:
        async with opener():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail, KeyError("a"))
                nursery.start_soon(fail, ValueError("b"))
    # the caller's nursery's group, with its two exceptions, not a group of one around it
    assert sorted(type(e).__name__ for e in info.value.exceptions) == ["KeyError", "ValueError"]
