"""What ``blockrep img check`` prints, in qemu-img's words (its dump_*_image_check)."""

from __future__ import annotations

from typing import Any

from ..qcow2.check import CheckResult


def json_image_check(res: CheckResult, filename: str) -> dict[str, Any]:
    """qemu-img's ImageCheck object: counters that are zero are left out."""
    out: dict[str, Any] = {
        "filename": filename,
        "format": "qcow2",
        "check-errors": res.check_errors,
    }
    for key, val in (
        ("image-end-offset", res.image_end_offset),
        ("corruptions", res.corruptions),
        ("leaks", res.leaks),
        ("corruptions-fixed", res.corruptions_fixed),
        ("leaks-fixed", res.leaks_fixed),
        ("total-clusters", res.total_clusters),
        ("allocated-clusters", res.allocated_clusters),
        ("fragmented-clusters", res.fragmented_clusters),
        ("compressed-clusters", res.compressed_clusters),
    ):
        if val:
            out[key] = val
    return out


def human_image_check(res: CheckResult) -> list[str]:
    """The report's paragraphs, one ``print`` each."""
    out = []
    if res.corruptions_fixed or res.leaks_fixed:
        out.append(
            f"The following inconsistencies were found and repaired:\n\n"
            f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now..."
        )
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.")
    if res.corruptions:
        out.append(
            f"\n{res.corruptions} errors were found on the image.\n"
            "Data may be corrupted, or further writes to the image may corrupt it."
        )
    if res.leaks:
        out.append(
            f"\n{res.leaks} leaked clusters were found on the image.\n"
            "This means waste of disk space, but no harm to data."
        )
    if res.total_clusters and res.allocated_clusters:
        t, allocated = res.total_clusters, res.allocated_clusters
        out.append(
            f"{allocated}/{t} = {allocated * 100.0 / t:0.2f}% allocated, "
            f"{res.fragmented_clusters * 100.0 / allocated:0.2f}% fragmented, "
            f"{res.compressed_clusters * 100.0 / allocated:0.2f}% compressed clusters"
        )
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}")
    return out


def check_exit_code(res: CheckResult) -> int:
    """qemu-img check's exit status: 1 check failed, 2 corrupt, 3 leaks only."""
    if res.check_errors:
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0
