"""Fail unless every `name==version` pin of a constraints file is what this environment has installed.

pip applies a constraints file only to packages it resolves; this makes the tested versions explicit in
the CI log and catches a pin that no longer constrains anything (a renamed or dropped dependency).
"""

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


def main(path: str) -> int:
    bad = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, pinned = line.partition("==")
        try:
            got = version(name.strip())
        except PackageNotFoundError:
            got = None
        # Compare releases only: the local torch wheel is 2.13.0+cpu for a pin of 2.13.0.
        ok = got is not None and Version(got).release == Version(pinned.strip()).release
        print(f"{name.strip():14} pinned {pinned.strip():10} installed {got}")
        if not ok:
            bad.append(name.strip())
    if bad:
        print(f"not installed at the pinned version: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
