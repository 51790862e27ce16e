"""Model-based tests: qcow2 chains of depth 1-3 against a bytearray model.

Random sequences of write / write_zeroes / discard / read / make_empty /
close+reopen run on the top image of a chain whose bottom is raw or qcow2 and
whose cluster sizes are mixed; make_empty takes each ``EmptyStyle`` (the seed
picks one), so images emptied with their old clusters left in the file are
refilled, reopened and emptied again. After every read, and at the end, what blockrep
reads equals the model byte for byte; at the end ``qemu-img check`` is clean on
every image blockrep wrote and ``qemu-img compare`` agrees with the model.
"""

from __future__ import annotations

import os
import random
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockrep.block import Graph
from blockrep.block.node import EmptyStyle
from tests.harness.images import make_qcow2, make_raw, open_image
from tests.harness.tools import run, tool

SIZES = [1 << 20, (2 << 20) + 4096, 3 << 20]
CLUSTERS = [512, 4096, 65536]


def apply_discard(model: bytearray, below: bytes, off: int, n: int, cs: int, v3: bool) -> None:
    """Whole clusters only; they read as zeroes (v3) or from the backing file (v2)."""
    size = len(model)
    end = off + n
    first = -(-off // cs)
    last = end // cs
    if end == size and end % cs:
        last += 1
    for c in range(first, last):
        a, b = c * cs, min((c + 1) * cs, size)
        model[a:b] = bytes(b - a) if v3 else below[a:b]


@st.composite
def chains(draw):
    depth = draw(st.integers(1, 3))
    bottom_raw = draw(st.booleans())
    size = draw(st.sampled_from(SIZES))
    layers = []
    for i in range(depth):
        if i == 0 and bottom_raw and depth > 1:
            layers.append(("raw", None, 3))
        else:
            layers.append(
                ("qcow2", draw(st.sampled_from(CLUSTERS)), draw(st.sampled_from([3, 3, 2])))
            )
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "write",
                        "write",
                        "write",
                        "zero",
                        "discard",
                        "read",
                        "empty",
                        "reopen",
                        "flush",
                    ]
                ),
                st.integers(0, size - 1),
                st.integers(1, 300_000),
                st.booleans(),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=30,
        )
    )
    return size, layers, ops, draw(st.integers(0, 2**32 - 1))


async def build_chain(d: str, size: int, layers, seed: int) -> tuple[list[str], bytes]:
    """Create the lower layers with some content; return paths and the view below the top."""
    rnd = random.Random(seed)
    paths: list[str] = []
    view = bytearray(size)
    for i, (fmt, cs, ver) in enumerate(layers):
        path = os.path.join(d, f"l{i}.{fmt}")
        if fmt == "raw":
            data = bytearray(size)
            for _ in range(4):
                off = rnd.randrange(size)
                n = min(rnd.randrange(1, 200_000), size - off)
                data[off : off + n] = rnd.randbytes(n)
            make_raw(path, bytes(data))
            view = data
        else:
            back = os.path.basename(paths[-1]) if paths else None
            back_fmt = layers[i - 1][0] if paths else None
            await make_qcow2(
                path, size, cluster_size=cs, backing=back, backing_fmt=back_fmt, version=ver
            )
            if i < len(layers) - 1:
                g = Graph()
                node = await open_image(g, path, "qcow2")
                for _ in range(3):
                    off = rnd.randrange(size)
                    n = min(rnd.randrange(1, 150_000), size - off)
                    data = rnd.randbytes(n)
                    await node.write(off, data)
                    view[off : off + n] = data
                await g.close_all()
        paths.append(path)
    return paths, bytes(view)


async def exercise(d: str, size: int, layers, ops, seed: int) -> tuple[list[str], bytearray]:
    paths, below = await build_chain(d, size, layers, seed)
    _, cs, ver = layers[-1]
    model = bytearray(below)
    top = paths[-1]
    style = list(EmptyStyle)[seed % len(EmptyStyle)]
    g = Graph()
    node = await open_image(g, top, "qcow2")
    node.empty_style = style
    for i, (op, off, n, flag, byte) in enumerate(ops):
        n = min(n, size - off)
        if op == "write":
            data = bytes([byte]) * n if flag else random.Random(seed + i).randbytes(n)
            await node.write(off, data)
            model[off : off + n] = data
        elif op == "zero":
            await node.write_zeroes(off, n, may_unmap=flag)
            model[off : off + n] = bytes(n)
        elif op == "discard":
            await node.discard(off, n)
            apply_discard(model, below, off, n, cs, ver >= 3)
        elif op == "read":
            got = await node.read(off, n)
            assert got == model[off : off + n], f"read mismatch at step {i}"
        elif op == "empty":
            await node.make_empty()
            model[:] = below
        elif op == "flush":
            await node.flush()
        elif op == "reopen":
            await g.close_all()
            g = Graph()
            node = await open_image(g, top, "qcow2")
            node.empty_style = style
    assert await node.read(0, size) == model
    await g.close_all()
    return paths, model


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_qcow2_chain_matches_model(params):
    size, layers, ops, seed = params
    with tempfile.TemporaryDirectory() as d:
        paths, model = run(exercise(d, size, layers, ops, seed))
        model_path = os.path.join(d, "model.raw")
        make_raw(model_path, bytes(model))
        for p, (fmt, _, _) in zip(paths, layers, strict=True):
            if fmt == "qcow2":
                r = tool("qemu-img", "check", p, check=False)
                assert r.returncode == 0, r.stdout + r.stderr
        r = tool(
            "qemu-img", "compare", "-f", "qcow2", "-F", "raw", paths[-1], model_path, check=False
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_large_refcount_growth(tmp_path):
    """512-byte clusters over 64 MiB force new refcount blocks and a larger reftable."""

    async def go():
        p = str(tmp_path / "g.qcow2")
        size = 64 << 20
        await make_qcow2(p, size, cluster_size=512)
        g = Graph()
        node = await open_image(g, p, "qcow2")
        rnd = random.Random(7)
        model = bytearray(size)
        for i in range(64):
            off = rnd.randrange(0, size - (256 << 10)) & ~511
            n = rnd.randrange(128 << 10, 256 << 10)
            data = rnd.randbytes(n)
            await node.write(off, data)
            model[off : off + n] = data
            if i % 10 == 0:
                await node.flush()
        await g.close_all()
        node = await open_image(g := Graph(), p, "qcow2", read_only=True)
        assert await node.read(0, size) == model
        await g.close_all()
        return p

    p = run(go())
    with open(p, "rb") as f:
        head = f.read(64)
    reftable_clusters = int.from_bytes(head[56:60], "big")
    assert reftable_clusters > 1, "the refcount table should have grown"
    r = tool("qemu-img", "check", p, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cs", [4096, 512])
def test_make_empty_styles_write_qemus_metadata(tmp_path, cs):
    """Every form of make_empty leaves QEMU's bytes: the fresh file (FRESH_FILE)
    and the in-place rewrite (SHRINK) byte for byte; KEEP_PAGES the same bytes
    up to where SHRINK cuts the file, and the file at its old length, which the
    same writes then fill again without growing it. Every image stays clean.
    512-byte clusters: the old contents spanned many refcount blocks, of which
    the emptied image keeps only the first."""
    results = {}
    for style in EmptyStyle:
        p = str(tmp_path / f"e-{style.value}.qcow2")
        base = str(tmp_path / "base.raw")
        make_raw(base, bytes(4 << 20))

        async def go(p=p, style=style):
            await make_qcow2(p, 4 << 20, backing="base.raw", backing_fmt="raw", cluster_size=cs)
            g = Graph()
            node = await open_image(g, p, "qcow2")
            node.empty_style = style

            async def fill(seed):
                rnd = random.Random(seed)
                model = bytearray(4 << 20)
                for _ in range(40):
                    off = rnd.randrange(0, (4 << 20) - 70000)
                    data = rnd.randbytes(70000)
                    await node.write(off, data)
                    model[off : off + len(data)] = data
                await node.flush()
                return model

            await fill(3)
            filled = os.path.getsize(p)
            await node.make_empty()
            assert await node.read(0, 4 << 20) == bytes(4 << 20)
            if style is EmptyStyle.KEEP_PAGES:
                assert os.path.getsize(p) == filled
                model = await fill(4)
                assert os.path.getsize(p) == filled, "the old clusters were not reused"
                assert await node.read(0, 4 << 20) == model
                await node.make_empty()
                assert await node.read(0, 4 << 20) == bytes(4 << 20)
            else:
                assert os.path.getsize(p) < filled
            await node.write(8192, b"after")
            await node.flush()
            await g.close_all()
            g = Graph()
            node = await open_image(g, p, "qcow2", read_only=True)
            assert await node.read(8192, 5) == b"after"
            assert await node.read(0, 8192) == bytes(8192)
            await g.close_all()

        run(go())
        r = tool("qemu-img", "check", p, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(p, "rb") as f:
            results[style] = f.read()
    shrunk = results[EmptyStyle.SHRINK]
    assert results[EmptyStyle.FRESH_FILE] == shrunk
    kept = results[EmptyStyle.KEEP_PAGES]
    assert len(kept) > len(shrunk) and kept[: len(shrunk)] == shrunk
    assert not [n for n in os.listdir(tmp_path) if "blockrep-swap" in n]
