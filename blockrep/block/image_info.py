"""QAPI ImageInfo of a node: what ``qemu-img info`` prints and query-block's ``image`` holds."""

from __future__ import annotations

from typing import Any

from .node import Node


def image_info(node: Node, *, flat: bool = False, opened_as: str | None = None) -> dict[str, Any]:
    """ImageInfo of a format node, in QEMU's key order.

    By default it is query-block's view: the backing file is the node the graph opened
    behind this one (which blockdev-add may have chosen), nested as ``backing-image``
    down the chain unless ``flat``. With ``opened_as`` (the name the image was opened
    by) it is ``qemu-img info``'s view: the backing file as the image header records it,
    no nesting, and qemu-img's key order.
    """
    info: dict[str, Any] = {
        "filename": opened_as if opened_as is not None else node.describe_filename(),
        "format": node.driver_name,
        "virtual-size": node.length,
        "dirty-flag": False,
    }
    f = node.file
    if f is not None and hasattr(f, "allocated_size"):
        info["actual-size"] = f.allocated_size()
    extra = node.info()
    for key in ("cluster-size", "format-specific"):
        if key in extra:
            info[key] = extra[key]
    if opened_as is None:
        b = node.backing
        if b is not None:
            info["backing-filename"] = b.describe_filename()
            info["full-backing-filename"] = b.describe_filename()
            info["backing-filename-format"] = b.driver_name
            if not flat:
                info["backing-image"] = image_info(b)
        return info
    info.update(_recorded_backing(node))
    # qemu-img puts the size first and the dirty flag last
    size, dirty = info.pop("virtual-size"), info.pop("dirty-flag")
    return {"virtual-size": size, **info, "dirty-flag": dirty}


def _recorded_backing(node: Node) -> dict[str, Any]:
    # the driver is loaded on first use, like every driver
    from ..qcow2.driver import Qcow2Node

    if not isinstance(node, Qcow2Node) or not node.h.backing_file:
        return {}
    bf = node.h.backing_file
    b = node.backing
    out: dict[str, Any] = {
        "backing-filename": bf,
        "full-backing-filename": b.describe_filename() if b is not None else bf,
    }
    if node.h.backing_format:
        out["backing-filename-format"] = node.h.backing_format
    return out
