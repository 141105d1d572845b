"""The reference pages, written from the code so they cannot drift from it.

- `reference/cli.md`: every tool (tools/*.py) and benchmark (benchmarks/*.py), its --help
  as its argparse parser prints it; tools/describe_model.py, a Hydra entry point, as its
  recipe (recipes/describe_model.yaml).
- `reference/schema.md`: every key of the recipe schema (config/schema.py's JobConfig and
  the dataclasses it nests), with its type, default and meaning (the comment above the field).

A parser is captured, not run: the script's `main` is called with argparse's parse step
replaced by one that hands back the parser, so nothing past the argument definitions runs
and no tool needs a parser-building function of its own. mkdocs runs this as a hook
(mkdocs.yml `hooks:`), adding the pages to the build without writing them to docs/;
`python docs/gen_reference.py OUT_DIR` writes them as files.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import os
import sys
import textwrap
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("tools", "benchmarks")
# Entry points configured by a Hydra recipe instead of argparse: script -> recipe name.
HYDRA_SCRIPTS = {"tools/describe_model.py": "describe_model"}
CLI_PAGE = "reference/cli.md"
SCHEMA_PAGE = "reference/schema.md"
# argparse's parse methods: a tool calls one of them once its parser is complete.
_PARSE_METHODS = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser, method: str):
        super().__init__(method)
        self.parser, self.method = parser, method


def script_paths() -> list[str]:
    """Every documented entry point, as a path relative to the repository."""
    return sorted(f"{d}/{p.name}" for d in SCRIPT_DIRS for p in (REPO / d).glob("*.py") if not p.name.startswith("_"))


def _load(script: str):
    path = REPO / script
    if str(path.parent) not in sys.path:  # benchmarks import their siblings by bare name
        sys.path.insert(0, str(path.parent))
    name = "_docref_" + script.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def capture_parser(script: str) -> tuple[argparse.ArgumentParser, str]:
    """(parser, the name of the parse method the script calls) of an argparse script."""
    module = _load(script)
    originals = {m: getattr(argparse.ArgumentParser, m) for m in _PARSE_METHODS}

    def capturing(method):
        def parse(self, *args, **kwargs):
            raise _Captured(self, method)
        return parse

    for method in _PARSE_METHODS:
        setattr(argparse.ArgumentParser, method, capturing(method))
    saved_argv = sys.argv
    sys.argv = [script]
    try:
        main = module.main
        if inspect.signature(main).parameters:
            main([])
        else:
            main()
    except _Captured as captured:
        # A subclass's own parse_args (e.g. cli._OneLineParser's checks) calls super(): report
        # the outermost method the script called.
        return captured.parser, captured.method
    finally:
        sys.argv = saved_argv
        for method, function in originals.items():
            setattr(argparse.ArgumentParser, method, function)
    raise RuntimeError(f"{script}: main() returned without parsing its arguments")


def parse_command(script: str, args: list[str]) -> str | None:
    """None when the script's parser accepts `args`, else argparse's error message."""
    parser, method = capture_parser(script)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            getattr(parser, method)(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit status {exit_.code}"
    return None


def script_help(script: str) -> str:
    parser, _ = capture_parser(script)
    parser.prog = f"python {script}"
    with _columns(100):
        return parser.format_help()


@contextlib.contextmanager
def _columns(n: int):
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(n)  # argparse wraps at the terminal width: fixed, so the page is stable
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def option_strings(script: str) -> set[str]:
    """Every option (--flag) of an argparse script."""
    parser, _ = capture_parser(script)
    return {s for action in parser._actions for s in action.option_strings}


def cli_page() -> str:
    lines = ["# Command-line reference", "",
             "Generated at build time from each script's argparse parser (docs/gen_reference.py): "
             "what `--help` prints. Hydra entry points take `key=value` overrides of their recipe; "
             "the training entry point `python -m elastic_megatron.train --config-name=<recipe>` takes "
             "the keys of the [recipe schema](schema.md).", ""]
    for script in script_paths():
        lines += [f"## `{script}`", ""]
        if script in HYDRA_SCRIPTS:
            recipe = REPO / "recipes" / f"{HYDRA_SCRIPTS[script]}.yaml"
            lines += [f"A Hydra entry point: `key=value` overrides of `recipes/{recipe.name}`, shown whole:", "",
                      "```yaml", recipe.read_text().rstrip(), "```", ""]
        else:
            lines += ["```text", script_help(script).rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


# --- the recipe schema ---------------------------------------------------------------------

@dataclasses.dataclass
class SchemaKey:
    key: str
    type: str
    default: str
    meaning: str


def _field_comments(cls) -> dict[str, str]:
    """field name -> the comment lines right above it (or at the end of its line)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    tree = ast.parse(source)
    comments = {}
    for node in tree.body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        line = lines[node.lineno - 1]
        inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        comments[node.target.id] = " ".join(above + ([inline] if inline else []))
    return comments


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if value == "???":
        return "required"
    return repr(value) if not isinstance(value, str) else value or '""'


def _type_name(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("Optional[", "optional[")


def _nested(cls, name):
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
        return hint, ""
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        if dataclasses.is_dataclass(arg):
            return arg, "[]"
    return None, ""


def schema_keys(cls=None, prefix: str = "") -> list[SchemaKey]:
    """Every key of the recipe schema, depth first, in declaration order."""
    if cls is None:
        from elastic_megatron.config.schema import JobConfig
        cls = JobConfig
    comments = _field_comments(cls)
    keys = []
    for f in dataclasses.fields(cls):
        nested, suffix = _nested(cls, f.name)
        key = f"{prefix}{f.name}"
        if nested is not None:
            doc = comments.get(f.name) or (inspect.getdoc(nested) or "")
            if suffix:  # a list of entries: the list itself, then the keys of one entry
                keys.append(SchemaKey(key, f"list[{nested.__name__}]", _default(f), doc))
            keys += schema_keys(nested, f"{key}{suffix}.")
        else:
            keys.append(SchemaKey(key, _type_name(f.type), _default(f), comments.get(f.name, "")))
    return keys


def schema_page() -> str:
    from elastic_megatron.config.schema import JobConfig
    lines = ["# Recipe schema reference", "",
             "Generated at build time from `elastic_megatron/config/schema.py` and the dataclasses it nests "
             "(docs/gen_reference.py). Every recipe (`recipes/<name>.yaml`) composes into this schema, so Hydra "
             "refuses an unknown key or a wrongly typed value before anything runs; override any key on the "
             "command line as `key=value` (e.g. `trainer.lr=1e-4`). Groups (`model=`, `elastic=`, `parallel=`, "
             "...) pick a file of `recipes/<group>/`. `list[X]` keys hold entries whose keys follow as "
             "`key[].field`.", ""]
    section = None
    for k in schema_keys(JobConfig):
        top = k.key.split(".")[0].split("[")[0]
        if top != section:
            section = top
            lines += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{k.key}` | `{cell(k.type)}` | `{cell(k.default)}` | {cell(k.meaning)} |")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return {CLI_PAGE: cli_page(), SCHEMA_PAGE: schema_page()}


# --- mkdocs hook ---------------------------------------------------------------------------

def on_files(files, config):
    from mkdocs.structure.files import File
    for uri, text in pages().items():
        files.append(File.generated(config, uri, content=text))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    for uri, text in pages().items():
        (out / uri).parent.mkdir(parents=True, exist_ok=True)
        (out / uri).write_text(text)
        print(out / uri)
