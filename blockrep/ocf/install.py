"""``blockrep ocf install``: the ``#!/bin/sh`` wrapper Pacemaker runs as ocf:blockrep:blockrep.

The wrapper answers ``meta-data`` itself (the XML is written into it: any user may ask,
and it cannot fail) and ``exec``s this very interpreter for every other action, with
PYTHONPATH only when blockrep is not importable without it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .metadata import metadata_xml

DEFAULT_PREFIX = "/usr/lib/ocf"
PROVIDER, AGENT = "blockrep", "blockrep"
_EOF = "BLOCKREP_OCF_METADATA"


def wrapper_script(python: str, pythonpath: str | None, metadata: str) -> str:
    lines = [
        "#!/bin/sh",
        "# ocf:blockrep:blockrep, written by `blockrep ocf install`: runs blockrep's agent",
        'if [ "$1" = meta-data ]; then',
        f"cat <<'{_EOF}'",
        metadata.rstrip("\n"),
        _EOF,
        "exit 0",
        "fi",
    ]
    if pythonpath:
        lines.append(f"PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}")
        lines.append("export PYTHONPATH")
    lines.append(f'exec {shlex.quote(python)} -m blockrep.cli ocf agent "$@"')
    return "\n".join(lines) + "\n"


def _needs_pythonpath(python: str) -> str | None:
    """The directory holding the blockrep package, if PYTHON cannot import it from /."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, "-c", "import blockrep"], cwd="/", env=env,
                       capture_output=True, timeout=60)  # fmt: skip
    if r.returncode == 0:
        return None
    return str(Path(__file__).resolve().parent.parent.parent)


def agent_path(prefix: str = DEFAULT_PREFIX) -> Path:
    return Path(prefix) / "resource.d" / PROVIDER / AGENT


def install(prefix: str = DEFAULT_PREFIX) -> Path:
    """Write the agent (mode 755, via a temporary name and a rename); its path."""
    path = agent_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)
    python = sys.executable
    text = wrapper_script(python, _needs_pythonpath(python), metadata_xml())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path
