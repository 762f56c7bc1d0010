"""README's cluster section runs as written: its job commands parse, and they ship the code.

The commands are read from README itself, so that a flag renamed in a job, or a command edited in
README, fails here rather than on a user's cluster.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _cluster_section() -> str:
    text = README.read_text()
    return text[text.index("## On a cluster") : text.index("## Tests")]


def _commands() -> list[str]:
    """Every shell command in the section's code blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", _cluster_section(), re.DOTALL)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def _submitted() -> list[list[str]]:
    return [shlex.split(command) for command in _commands() if command.startswith("ray job submit")]


def test_every_job_of_the_pipeline_is_submitted():
    modules = {argv[argv.index("--") + 3] for argv in _submitted()}
    assert modules == {"jobs.make_shapes", "jobs.train", "jobs.segment", "jobs.evaluate"}


@pytest.mark.parametrize("argv", _submitted(), ids=lambda argv: argv[argv.index("--") + 3])
def test_each_submitted_command_parses_with_its_jobs_parser_and_ships_the_code(argv):
    options, (python, dash_m, module, *args) = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert (python, dash_m) == ("python", "-m")
    assert options[options.index("--working-dir") + 1] == "."
    parsed = importlib.import_module(module).build_parser().parse_args(args)
    # On a cluster every path is on S3: the nodes share no disk.
    paths = [value for value in vars(parsed).values() if isinstance(value, str) and "/" in value]
    assert paths and all(path.startswith("s3://") for path in paths), paths


def test_a_submitted_runtime_env_sets_env_vars():
    with_env = [argv for argv in _submitted() if "--runtime-env-json" in argv]
    [runtime_env] = [argv[argv.index("--runtime-env-json") + 1] for argv in with_env]
    assert list(json.loads(runtime_env)) == ["env_vars"]
