"""docs/configuration.md, written from the settings model: every key's type, default,
environment variable and description come from ``tiered.config``, so the reference cannot drift
from what the code accepts.

``python -m tiered.config_docs`` rewrites the page; ``--check`` exits 1 when the committed page
differs (``make test`` runs it).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import itertools
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tiered.config import ENV_PREFIX, TieredConfig, TieredSettings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

_INTRO = """\
# Configuration reference

<!-- Written by `python -m tiered.config_docs` from tiered/config.py: edit the model, not this
page. `make test` checks that the two agree. -->

Two ways in, one model:

- **The native API**: one YAML file, read by the trainer (`tiered.CheckpointManager`) and the
  daemon (`--config FILE`). Top-level keys carry MaxText's names and meanings; other top-level
  keys are ignored. tiered's own settings go under `tiered:`.
- **MaxText**, which refuses keys it does not know: the daemon reads MaxText's own file as MaxText
  does (`--maxtext-config FILE`: its `base_config` chain, then MaxText's `key=value` overrides
  given after the command), and its own settings from a second file (`--config FILE`) that holds
  only the `tiered:` section. [maxtext.md](maxtext.md) has the recipe. MaxText has no
  `checkpoint_dir` key: with MaxText the durable tier is always
  `{base_output_directory}/{run_name}/checkpoints`.

The environment variable beside each key overrides the file's value (parsed as a YAML scalar).
"""

_ERRORS = """\
## Errors

Every problem of a configuration is reported in one run, one line each, each prefixed with where
its value came from: the file and line (`c.yml:6`), the environment variable
(`environment variable TIERED_CHECKPOINT_PERIOD`) or MaxText's override
(`MaxText override checkpoint_period=abc`). For example:

```
tiered: error: c.yml: 2 problems
  c.yml:6: unknown key tiered.local_max_to_kep; did you mean 'local_max_to_keep'?
  c.yml:7: unknown key tiered.upload_concurency; did you mean 'upload_concurrency'?
```

An unknown `tiered:` key is an error that suggests the nearest valid key, and so is a top-level
section one letter away from `tiered:` (`teired:`), whose settings would otherwise be ignored. A
top-level key one edit away from a MaxText key (`local_checkpoint_perod`) gets a warning naming
it. The cross-field rules each name the key to change: a durable period that is not a multiple of
`local_checkpoint_period`, a non-positive period, both backup intervals set, a missing
`local_checkpoint_directory`, the two tiers in one directory or one inside the other (naming both
keys), an unsupported URL scheme (the message lists the installed fsspec protocols). A file
error is one line: malformed YAML (with line and column), a file that is not UTF-8, a `tiered:`
section in MaxText's file, MaxText keys in tiered's second file.
[troubleshooting.md](troubleshooting.md) lists the errors a new user meets most.
"""


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(annotation))
    text = re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(annotation))
    text = text.replace("NoneType", "None")
    return "`" + text.replace(" | ", "` \\| `") + "`"


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, float) and value.is_integer():
        return f"`{value:g}`"
    return f"`{value}`"


def attribute_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the model's source: not
    with pydantic's ``use_attribute_docstrings``, which parses the source on every import."""
    tree = ast.parse(inspect.getsource(model))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = after.value.value
    return docs


def _markdown(text: str) -> str:
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def _table(model: type[BaseModel], *, prefix: str) -> list[str]:
    rows = [
        "| key | type | default | environment | meaning |",
        "|---|---|---|---|---|",
    ]
    docs = attribute_docstrings(model)
    for name, field in model.model_fields.items():
        if name == "tiered":
            continue
        rows.append(
            f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | "
            f"`{ENV_PREFIX}{name.upper()}` | {_markdown(docs.get(name, ''))} |"
        )
    return rows


def render() -> str:
    """The whole page."""
    parts = [
        _INTRO,
        "## MaxText keys (top level)\n",
        "\n".join(_table(TieredConfig, prefix="")) + "\n",
        "## `tiered:` keys\n",
        "\n".join(_table(TieredSettings, prefix="")) + "\n",
        _ERRORS,
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiered.config_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
    parser.add_argument("--path", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != page:
            print(
                f"{args.path} is stale: run python -m tiered.config_docs to rewrite it",
                file=sys.stderr,
            )
            return 1
        return 0
    args.path.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
