"""Emptying the secondary's two buffers, active and hidden, all or nothing.

A checkpoint drops S's speculative writes (active) and the pre-images of P's
last epoch (hidden) together. Emptying one and failing on the other leaves a
pair from two different epochs: S's view is then neither its own nor P's. So
active is only *staged* (its emptying prepared so that it can still be taken
back), hidden is emptied in one step that either succeeds or changes nothing,
and only then is active's emptying finished — or taken back if hidden's failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..block.node import Node, PreparedEmpty
from ..errors import BlockError


@dataclass
class EmptyFailed(Exception):
    """The buffers could not be emptied; ``buffer`` names the one that failed.

    ``consistent``: both buffers read as before the attempt (false only when a
    second failure kept the first from being taken back or finished).
    """

    buffer: str
    error: BlockError
    consistent: bool = True
    detail: str = ""


async def empty_buffers(active: Node, hidden: Node) -> None:
    """Empty ``active`` and ``hidden``, both or neither; raises EmptyFailed."""
    plans: list[tuple[str, PreparedEmpty]] = []
    for name, node in (("active", active), ("hidden", hidden)):
        try:
            plans.append((name, node.prepare_make_empty()))
        except BlockError as e:
            raise EmptyFailed(name, e) from None
    if not plans[0][1].undoable:
        plans.reverse()  # stage whichever of the two can be taken back
    (first_name, staged), (last_name, last) = plans
    try:
        await staged.stage()
    except BlockError as e:
        raise EmptyFailed(first_name, e) from None
    try:
        await last.commit()
    except BlockError as e:
        try:
            await staged.undo()
        except BlockError as u:
            raise EmptyFailed(
                last_name,
                e,
                consistent=False,
                detail=f"; the {first_name} disk could not be restored: {u.message}",
            ) from None
        raise EmptyFailed(last_name, e) from None
    try:
        await staged.finish()
    except BlockError as e:
        raise EmptyFailed(
            first_name, e, consistent=False, detail=f"; the {last_name} disk was emptied"
        ) from None
