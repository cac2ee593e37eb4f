"""A folder that shows torch, and what torch itself requires, to a bare Python (a rehearsal).

``python benchmarks/torch_only.py DIR`` links into ``DIR`` the installed torch distribution and
the distributions it requires (recursively, extras left out), nothing else. A bare interpreter
with ``PYTHONPATH=DIR`` then looks like the GPU machine of ``benchmarks/device_check.sh``:
Python and torch, none of the project's other dependencies (``make rehearse-device``).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of ``dist``'s unconditional requirements (markers that hold here kept)."""
    from packaging.requirements import Requirement

    names = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def closure(root: str) -> list[metadata.Distribution]:
    """``root`` and every distribution it requires, once each."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        seen[name] = dist
        todo += requirement_names(dist)
    return list(seen.values())


def main() -> None:
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for dist in closure("torch"):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            source = Path(str(dist.locate_file(top)))
            if top == "__pycache__" or top.endswith(".pth") or not source.exists():
                continue
            link = target / top
            if not link.exists():
                link.symlink_to(source)
        print(f"{dist.metadata['Name']} {dist.version}")


if __name__ == "__main__":
    main()
