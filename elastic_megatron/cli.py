"""One way for every entry point (the trainer and tools/*.py) to report bad input.

A `ConfigError` (bad key or value), a missing file, a checkpoint that fails its checks,
a run dir in use, a full disk or a diverged run is the user's to fix, not a bug: it is
printed as one `error: ...` line naming what was wrong and what is allowed, on stderr,
from one rank, with exit status 2 and no traceback.
`--debug` (or ELASTIC_MEGATRON_DEBUG=1) re-raises it with the traceback. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

DEBUG_ENV = "ELASTIC_MEGATRON_DEBUG"
EXIT_BAD_INPUT = 2
# A run stopped by SIGTERM/SIGUSR1 after saving: not finished, resumable (EX_TEMPFAIL).
EXIT_STOPPED = 75


# Errors that end a job with a message, by module: a module's error can only have been raised
# if the module was imported, so only those already loaded are looked up (importing the
# checkpoint store or the training loop would pull in megatron.core: seconds, for nothing).
_USER_ERRORS = (
    ("elastic_megatron.config.errors", "ConfigError"),
    ("elastic_megatron.checkpoint.manifest", "CheckpointCorrupt"),
    ("elastic_megatron.checkpoint.lock", "RunDirLocked"),
    ("elastic_megatron.checkpoint.store", "CheckpointSaveError"),
    ("elastic_megatron.training.loop", "TrainingDiverged"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that end a job with a message instead of a traceback: bad input,
    a checkpoint that fails verification, a run dir in use, a save the disk cannot hold,
    a run that diverged; those of modules not loaded yet are left out (see _USER_ERRORS)."""
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (FileNotFoundError, *loaded)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def pop_debug_flag(argv: list[str] | None = None) -> bool:
    """Remove `--debug` from `argv` (default sys.argv) before Hydra or argparse sees it,
    remembering it in ELASTIC_MEGATRON_DEBUG; True when tracebacks are asked for."""
    argv = sys.argv if argv is None else argv
    if "--debug" in argv:
        argv[:] = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    if debug_requested():
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra entry points: the whole traceback
    return debug_requested()


def tool_parser(doc: str, whole_doc: bool = False) -> argparse.ArgumentParser:
    """The argument parser of a tool in tools/: its docstring's first paragraph (or all of
    it, as written) as the description, and --debug."""
    if whole_doc:
        parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of a bad-input error (or set {DEBUG_ENV}=1)")
    parser.add_argument("--verify", choices=("hashes", "sizes"), default=os.environ.get("ELASTIC_MEGATRON_VERIFY", "hashes"),
                        help="how input checkpoints are verified against their manifest: every byte's hash (default) "
                             "or presence and sizes only (huge checkpoints)")
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as the other bad input is reported: one `error:`
    line (no usage block), exit status 2."""

    takes_overrides = False

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for override in parsed.overrides if self.takes_overrides else []:
            key = override.split("=", 1)[0].lstrip("+~")
            if "=" not in override or "." not in key:  # `model=small` for --model small: a setting of the benchmark's own
                option = f"--{key.replace('_', '-')}"
                self.error(f"{override!r}: positional arguments are Hydra overrides of dotted keys, KEY=VALUE (e.g. "
                           f"trainer.lr=1e-4); the benchmark's own settings are options"
                           f"{f' ({option})' if option in self._option_string_actions else ''}")
        return parsed


def benchmark_parser(doc: str, overrides: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark (benchmarks/*.py): its whole docstring, as
    written, as --help (what it measures and how to read the figures), --debug, and a bad
    option as one `error:` line with exit status 2. `overrides`: the help of positional
    Hydra overrides (args.overrides, dotted KEY=VALUE) for a benchmark that composes jobs.
    Run the benchmark with `run_benchmark`."""
    parser = _OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of a bad-input error (or set {DEBUG_ENV}=1)")
    if overrides:
        parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)
        parser.takes_overrides = True
    return parser


def run_benchmark(args: argparse.Namespace, job: Callable[[], object]) -> int:
    """Run a benchmark's `job` (returning its exit status, None for 0): bad input from any of
    its stages (a ConfigError, a missing file, ...) ends it as one `error:` line, exit 2."""
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    code, result = report_errors(job)
    return code or int(result or 0)


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def report_errors(job: Callable[[], object]) -> tuple[int, object]:
    """Run `job`; (0, result), or (2, None) after printing the bad-input error."""
    try:
        return 0, job()
    except user_errors() as err:
        if debug_requested():
            raise
        if _is_rank0():
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT, None


def run_tool(args: argparse.Namespace, job: Callable[[], object], done: Callable[[object], str]) -> int:
    """Run `job`; print `done(result)` and return 0, or report bad input (exit status 2).
    `args` are the tool's parsed arguments (from `tool_parser`)."""
    from elastic_megatron.checkpoint import verify

    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    verify.set_level(args.verify)
    code, result = report_errors(job)
    if code == 0:
        text = done(result)
        if text:
            print(text)
    return code
