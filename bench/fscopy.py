"""``python -m bench.fscopy put|get SRC DST URL OPTIONS_JSON``: the baseline the memory table
sets beside tiered: one plain fsspec ``put_file`` or ``get_file`` of a file, with the client's
default settings (``URL`` names the filesystem, ``OPTIONS_JSON`` its storage options)."""

from __future__ import annotations

import json
import sys

import fsspec


def main() -> None:
    verb, src, dst, url, options = sys.argv[1:]
    fs, _ = fsspec.core.url_to_fs(url, **json.loads(options))
    if verb == "put":
        fs.put_file(src, dst)
    else:
        fs.get_file(src, dst)


if __name__ == "__main__":
    main()
