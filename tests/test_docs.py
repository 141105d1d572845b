"""The documentation runs (DESIGN invariant 17).

- The site builds with `mkdocs build --strict` (a broken link or a page missing from the nav
  fails), and its generated references list every tool, benchmark and schema key.
- Every command in a shell block of README.md and docs/*.md is checked: it runs here where
  that takes no input a test session lacks (describe_model tables, --list-tasks), else it is
  checked to parse: a tool's or benchmark's own argparse parser accepts its arguments, a
  training command's recipe composes with its overrides (the Slurm launchers' too), a
  `make` target exists (`make -n`), a `pip install` names extras pyproject.toml has.
  A block that is only illustrative says so (`<!-- illustrative -->` on the line before it);
  output is fenced as ```text or ```console, never left unlabeled.
Failures name the page, the line and the command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
import typing

import pytest

from conftest import REPO

SHELL_FENCES = ("bash", "sh", "shell")
# Fences whose content is not run: output, data, code of other languages, diagrams.
OTHER_FENCES = ("text", "console", "python", "yaml", "json", "mermaid", "toml")
ILLUSTRATIVE = "<!-- illustrative -->"
# Other projects' commands shown next to ours (an inference engine serving a slice): not ours to check.
EXTERNAL_PROGRAMS = ("vllm",)
# Shell syntax around checked commands (a loop's body is checked line by line).
SHELL_KEYWORDS = ("for", "do", "done")
# Stands in for a placeholder such as `<importance run dir>` (a value the reader supplies).
PLACEHOLDER = "PLACEHOLDER"


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = sys.modules.get("gen_reference")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_reference"] = module
        spec.loader.exec_module(module)
    return module


def documented_pages() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@dataclasses.dataclass
class Command:
    page: str
    line: int
    text: str

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def shell_commands(path) -> tuple[list[Command], list[str]]:
    """(the commands of the page's shell blocks, one per logical line; the page's problems:
    fences without a language)."""
    rel = path.relative_to(REPO).as_posix()
    commands, problems = [], []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(2), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        illustrative = start > 0 and any(lines[k].strip() == ILLUSTRATIVE for k in range(max(0, start - 2), start))
        if not lang:
            problems.append(f"{rel}:{start + 1}: a fence without a language (```bash for commands, ```text for output)")
        elif lang in SHELL_FENCES and not illustrative:
            pending, first = "", None
            for k in range(start + 1, end):
                line = lines[k]
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                first = first if pending else k + 1
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                commands.append(Command(rel, first, " ".join((pending + line).split())))
                pending = ""
        elif lang not in SHELL_FENCES + OTHER_FENCES:
            problems.append(f"{rel}:{start + 1}: fence language {lang!r}: use one of {SHELL_FENCES + OTHER_FENCES}")
        i = end + 1
    return commands, problems


def split_words(text: str) -> list[str]:
    text = re.sub(r"<[^<>]*>", PLACEHOLDER, text)
    words = shlex.split(text, comments=True)
    return [w for w in words if w != "..."]


class Checker:
    """Checks one documented command; returns None when it holds, else why not."""

    def __init__(self):
        self.ref = _gen_reference()
        self.extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        self.make_targets: dict[str, str | None] = {}

    def __call__(self, command: Command) -> str | None:
        try:
            words = split_words(command.text)
        except ValueError as err:
            return f"cannot split: {err}"
        # a pipeline or a list: each part on its own
        parts, part = [], []
        for w in words:
            if w in ("|", "&&", ";", "||"):
                parts.append(part)
                part = []
            else:
                part.append(w)
        parts.append(part)
        for part in parts:
            why = self.check(part)
            if why:
                return why
        return None

    def check(self, words: list[str]) -> str | None:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the command
            words = words[1:]
        if not words:
            return "empty command"
        program, args = words[0], words[1:]
        if program in ("python", "python3"):
            return self.python(args)
        if program == "torchrun":
            if "-m" not in args:
                return "torchrun without -m <module>"
            return self.python(args[args.index("-m"):])
        if program in ("sbatch", "bash"):
            return self.slurm(args)
        if program == "make":
            return self.make(args)
        if program == "pip":
            return self.pip(args)
        if program in ("mkdir", "grep") or program in SHELL_KEYWORDS or program in EXTERNAL_PROGRAMS:
            return None
        return f"no check for {program!r}: run it in tests/test_docs.py or mark the block {ILLUSTRATIVE}"

    def python(self, args: list[str]) -> str | None:
        if args[:2] == ["-m", "elastic_megatron.train"]:
            return self.train(args[2:])
        if not args or args[0] == "-m":
            return f"no check for python {' '.join(args[:2])}"
        script = args[0]
        if not (REPO / script).is_file():
            return f"{script}: no such script"
        if script in self.ref.HYDRA_SCRIPTS:
            return self.describe_model(args[1:])
        why = self.ref.parse_command(script, args[1:])
        if why:
            return why
        if script == "tools/evaluate_tasks.py" and args[1:] == ["--list-tasks"]:
            return self.run_list_tasks()
        return None

    def train(self, args: list[str]) -> str | None:
        recipe, overrides = None, []
        it = iter(args)
        for w in it:
            if w.startswith("--config-name="):
                recipe = w.split("=", 1)[1]
            elif w == "--config-name":
                recipe = next(it)
            elif w.startswith("-"):
                return f"option {w!r}: the trainer takes --config-name=<recipe> and key=value overrides"
            else:
                overrides.append(w)
        if recipe is None:
            return "no --config-name=<recipe>"
        return self.compose(recipe, overrides)

    @staticmethod
    def compose(recipe: str, overrides: list[str]) -> str | None:
        from elastic_megatron.config.compose import compose_recipe
        from elastic_megatron.config.errors import ConfigError

        try:
            compose_recipe(recipe, overrides)
        except ConfigError as err:
            return str(err)
        return None

    def describe_model(self, overrides: list[str]) -> str | None:
        """Composed as the tool composes it; run whole unless it reads a checkpoint."""
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException

        describe = self.ref._load("tools/describe_model.py").describe
        try:
            with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base=None):
                cfg = compose(config_name=self.ref.HYDRA_SCRIPTS["tools/describe_model.py"], overrides=overrides)
        except HydraException as err:
            return " ".join(str(err).split())
        if cfg.checkpoint is not None:  # measured on files a test session does not have
            return None
        try:
            text = describe(cfg)
        except Exception as err:  # noqa: BLE001 (any failure of a documented command is reported)
            return f"{type(err).__name__}: {err}"
        return None if text.strip() else "printed nothing"

    def run_list_tasks(self) -> str | None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = self.ref._load("tools/evaluate_tasks.py").main(["--list-tasks"])
        if code:
            return f"exit status {code}"
        return None if "stdlib_cloze" in out.getvalue() else "did not list the shipped tasks"

    def slurm(self, args: list[str]) -> str | None:
        scripts = [i for i, a in enumerate(args) if a.startswith("slurm/") and a.endswith(".sh")]
        if not scripts:
            return "no slurm/<launcher>.sh"
        script, rest = args[scripts[0]], [a for a in args[scripts[0] + 1:] if a != "--dry-run"]
        text = (REPO / script).read_text() if (REPO / script).is_file() else None
        if text is None:
            return f"{script}: no such launcher"
        launch = re.search(r"^launch (\w+) \"\$@\"", text, re.M)
        if launch:  # a training stage: its recipe with cluster=slurm and the given overrides
            return self.compose(launch.group(1), ["cluster=slurm", *rest])
        if script == "slurm/serve_fleet.sh":
            return self.serve_fleet(rest)
        if script == "slurm/preprocess.sh":  # the array size is the launcher's own option
            return self.ref.parse_command("tools/preprocess_data.py", [a for a in rest if not a.startswith("--array=")])
        if script == "slurm/serve.sh":
            return self.ref.parse_command("tools/serve.py", rest)
        return f"no check for {script}"

    def serve_fleet(self, args: list[str]) -> str | None:
        """Run for real as its --dry-run (bash only: it prints every command, starts nothing),
        from a scratch root holding the launchers and the slices it names; the front end's
        options (after --) must parse as tools/serve.py's."""
        import tempfile

        front = args[args.index("--") + 1:] if "--" in args else []
        with tempfile.TemporaryDirectory() as root:
            os.symlink(REPO / "slurm", os.path.join(root, "slurm"))
            for i, a in enumerate(args[:-1]):
                if a == "--budget" and "=" in args[i + 1]:
                    path = args[i + 1].split("=", 1)[1].rsplit(":", 1)[0]
                    os.makedirs(os.path.join(root, path.lstrip("/")), exist_ok=True)
            env = {**os.environ, "ELASTIC_MEGATRON_ROOT": root}
            env.pop("SLURM_JOB_ID", None)
            result = subprocess.run(["bash", str(REPO / "slurm" / "serve_fleet.sh"), "--dry-run", *args], cwd=root,
                                    env=env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return self.ref.parse_command("tools/serve.py", ["--upstreams", "fleet.yaml", *front]) if front else None

    def make(self, args: list[str]) -> str | None:
        targets = [a for a in args if not a.startswith("-") and "=" not in a] or ["all"]
        for target in targets:
            if target not in self.make_targets:
                result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
                self.make_targets[target] = None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1]
            if self.make_targets[target]:
                return f"make {target}: {self.make_targets[target]}"
        return None

    def pip(self, args: list[str]) -> str | None:
        if args[:1] == ["list"]:
            return None
        if args[:1] != ["install"]:
            return f"no check for pip {' '.join(args[:1])}"
        for spec in args[1:]:
            extras = re.match(r"^\.\[(.*)\]$", spec)
            unknown = extras and set(extras.group(1).split(",")) - self.extras
            if unknown:
                return f"pip install {spec}: no extra {sorted(unknown)} (pyproject.toml has {sorted(self.extras)})"
        return None


@pytest.fixture(scope="module")
def checker():
    saved = dict(os.environ)
    yield Checker()
    os.environ.clear()
    os.environ.update(saved)  # evaluate_tasks sets the HF offline variables on import


def all_commands():
    commands, problems = [], []
    for path in documented_pages():
        found, bad = shell_commands(path)
        commands += found
        problems += bad
    return commands, problems


def test_every_documented_command_runs_or_parses(checker):
    commands, problems = all_commands()
    pages = {c.page for c in commands}
    assert "README.md" in pages and len(pages) >= 10, f"shell blocks found only on {sorted(pages)}"
    failures = problems + [f"{c.where()}\n    -> {why}" for c in commands if (why := checker(c))]
    assert not failures, f"{len(failures)} of {len(commands)} documented commands fail:\n" + "\n".join(failures)


def test_a_renamed_flag_fails_naming_page_and_command(checker, monkeypatch):
    """The check can fail: tools/generate.py's --max-new-tokens renamed in its parser (as a
    refactor would) makes every documented command using it fail, by page and command."""
    ref = checker.ref
    capture = ref.capture_parser

    def renamed(script):
        parser, method = capture(script)
        if script == "tools/generate.py":
            action = parser._option_string_actions.pop("--max-new-tokens")
            action.option_strings = ["--max-tokens"]
            parser._option_string_actions["--max-tokens"] = action
        return parser, method

    monkeypatch.setattr(ref, "capture_parser", renamed)
    commands, _ = all_commands()
    using = [c for c in commands if "tools/generate.py" in c.text and "--max-new-tokens" in c.text]
    assert using, "no documented command of tools/generate.py uses --max-new-tokens any more: pick another flag"
    failing = [(c, why) for c in using if (why := checker(c))]
    assert [c for c, _ in failing] == using
    assert all("--max-new-tokens" in why for _, why in failing), failing
    assert any(c.page.startswith("docs/") for c in using)


def test_unknown_options_and_keys_are_caught(checker):
    cases = {
        "python tools/serve.py --checkpoint x --max-batchsize 4": "--max-batchsize",
        "python -m elastic_megatron.train --config-name=stage1_tiny trainer.learning_rate=1": "learning_rate",
        "sbatch slurm/stage2.sh elastic.no_such_key=1": "no_such_key",
        "python tools/describe_model.py model=no_such_preset": "no_such_preset",
        "make no-such-target": "no-such-target",
        "pip install -e '.[serve,nosuchextra]'": "nosuchextra",
        "curl http://127.0.0.1:8000/v1/models": "curl",
    }
    for text, named in cases.items():
        why = checker(Command("case", 1, text))
        assert why and named in why, (text, why)


# --- the generated references --------------------------------------------------------------

def schema_keys_walked(cls, prefix=""):
    """Every key of the schema, walked here independently of docs/gen_reference.py."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        entry = typing.get_args(hint)[0] if typing.get_origin(hint) is list and typing.get_args(hint) else None
        if dataclasses.is_dataclass(hint):
            keys += schema_keys_walked(hint, f"{prefix}{f.name}.")
        elif entry is not None and dataclasses.is_dataclass(entry):
            keys += [f"{prefix}{f.name}"] + schema_keys_walked(entry, f"{prefix}{f.name}[].")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_reference_pages_cover_every_script_option_and_schema_key():
    from elastic_megatron.config.schema import JobConfig

    ref = _gen_reference()
    pages = ref.pages()
    cli = pages[ref.CLI_PAGE]
    sections = dict(re.findall(r"^## `([^`]+)`\n(.*?)(?=^## |\Z)", cli, re.S | re.M))
    scripts = sorted(f"{d}/{p.name}" for d in ("tools", "benchmarks") for p in (REPO / d).glob("*.py"))
    assert sorted(sections) == scripts
    for script in scripts:
        if script in ref.HYDRA_SCRIPTS:
            assert "format: table" in sections[script]
            continue
        missing = [o for o in ref.option_strings(script) if o not in sections[script]]
        assert not missing, f"{script}: options missing from the CLI reference: {missing}"
    schema = pages[ref.SCHEMA_PAGE]
    rows = dict(re.findall(r"^\| `([^`]+)` \| .*? \| .*? \| (.*) \|$", schema, re.M))
    walked = schema_keys_walked(JobConfig)
    assert sorted(rows) == sorted(walked)
    undocumented = [k for k in walked if not rows[k].strip()]
    assert not undocumented, f"schema keys without a meaning (a comment above the field): {undocumented}"


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`, as `make docs`: every page in the nav, no broken link; the
    generated references are in the site."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cli = (site / "reference" / "cli" / "index.html").read_text()
    schema = (site / "reference" / "schema" / "index.html").read_text()
    for script in sorted(p.name for d in ("tools", "benchmarks") for p in (REPO / d).glob("*.py")):
        assert script in cli, script
    assert "elastic.curriculum.budgets_per_batch" in schema and "trainer.recompute_modules" in schema
    for page in sorted((REPO / "docs").glob("*.md")):
        assert (site / (page.stem if page.stem != "index" else "") / "index.html").is_file(), page.name
