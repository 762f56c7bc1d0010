"""cluster.yaml's head start command leaves a cluster that answers only to its token.

Ray 2.60's `ray start --head` turns token authentication on only where a token exists; cluster.yaml
copies one to every node and starts Ray with RAY_AUTH_MODE=token. The head here is started with
that command's flags and environment (tests/local_head.py), its token generated as README says.
"""

from __future__ import annotations

import re

import pytest
from local_head import generate_token, local_head, ray_cli, start_fails, submit_job

pytestmark = pytest.mark.slow

JOB = ("--", "python", "-c", "print('the job ran')")


def test_the_head_refuses_jobs_without_its_token_and_runs_them_with_it(free_ports, tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    token = generate_token(home)
    with local_head(home, free_ports) as address:
        submit = ("--address", address, *JOB)

        # A client that sends no token (no RAY_AUTH_MODE, as in a fresh shell), or a wrong one.
        anonymous = submit_job(elsewhere, *submit)
        wrong = submit_job(elsewhere, *submit, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * len(token))
        for refused in (anonymous, wrong):
            assert refused.returncode != 0
            assert "the job ran" not in refused.stdout
            assert "authentication" in (refused.stdout + refused.stderr).lower()

        # README's client: the token in ~/.ray/auth_token and RAY_AUTH_MODE=token.
        accepted = submit_job(home, *submit, RAY_AUTH_MODE="token")
        assert accepted.returncode == 0, accepted.stderr[-3000:]
        assert "the job ran" in accepted.stdout
        # The refused submissions never became jobs.
        listed = ray_cli(home, "job", "list", "--address", address, RAY_AUTH_MODE="token").stdout
        assert len(set(re.findall(r"raysubmit_\w+", listed))) == 1, listed


def test_a_head_without_the_token_does_not_start_open(free_ports, tmp_path):
    """Were the token not copied to a node, its `ray start` fails instead of running unprotected."""
    output = start_fails(tmp_path, free_ports)
    assert "token" in output.lower()
