"""`ray up cluster.yaml` gets past Ray's AWS bootstrap, and the head may launch its workers.

AWS is a moto server on 127.0.0.1 (EC2, IAM and STS as well as S3), in a process of its own so
that turning its IAM enforcement on touches no other test. The instance profiles come from
deploy/aws_iam.py, as README has the user create them; then Ray's own code runs against them:
`bootstrap_aws` (what `ray up` does before launching the head: key pair, subnets, security group,
instance profiles, image) and the AWS node provider the head's autoscaler uses, signed with the
head role's credentials while moto checks every call against that role's policies.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
import requests
import yaml
from conftest import free_port
from ray.autoscaler._private.aws import node_provider
from ray.autoscaler._private.aws.config import bootstrap_aws
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.node_launch_exception import NodeLaunchException

REPO = Path(__file__).resolve().parent.parent
BUCKET = "my-bucket"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto server of its own with README's IAM step done; yields its endpoint URL.

    While the module runs, boto3 in this process (Ray's bootstrap and node provider included)
    talks to it through AWS_ENDPOINT_URL, and HOME is a temp dir (bootstrap writes the cluster's
    SSH key under ~/.ssh).
    """
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "HOME")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, HOME=str(tmp_path_factory.mktemp("home")))
    try:
        _wait_until_up(endpoint)
        subprocess.run(
            [sys.executable, str(REPO / "deploy" / "aws_iam.py"), "--bucket", BUCKET],
            env={**os.environ, "AWS_DEFAULT_REGION": "us-west-2"},
            check=True,
            capture_output=True,
        )
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def bootstrapped(aws) -> dict:
    """cluster.yaml after `prepare_config`, `validate_config` and `bootstrap_aws`, as `ray up`."""
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    return bootstrap_aws(config)


def test_bootstrap_resolves_key_pair_subnets_security_group_and_image(bootstrapped):
    ec2 = boto3.client("ec2", region_name="us-west-2")
    key_names = {pair["KeyName"] for pair in ec2.describe_key_pairs()["KeyPairs"]}
    subnet_ids = {subnet["SubnetId"] for subnet in ec2.describe_subnets()["Subnets"]}
    group_ids = {group["GroupId"] for group in ec2.describe_security_groups()["SecurityGroups"]}
    for name, node_type in bootstrapped["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["KeyName"] in key_names, name
        assert set(node_config["SubnetIds"]) <= subnet_ids and node_config["SubnetIds"], name
        assert set(node_config["SecurityGroupIds"]) <= group_ids and node_config["SecurityGroupIds"], name
        # A named image on every node: without one Ray falls back to an old Deep Learning AMI.
        assert node_config["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/"), name
    assert Path(bootstrapped["auth"]["ssh_private_key"]).expanduser().exists()
    assert bootstrapped["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_every_node_type_names_an_instance_profile_that_exists(bootstrapped):
    iam = boto3.client("iam")
    for name, node_type in bootstrapped["available_node_types"].items():
        profile_name = node_type["node_config"]["IamInstanceProfile"]["Name"]
        profile = iam.get_instance_profile(InstanceProfileName=profile_name)["InstanceProfile"]
        assert [role["RoleName"] for role in profile["Roles"]] == [profile_name], name


def test_head_policy_grants_every_ec2_call_of_rays_node_provider_and_passes_the_worker_role(bootstrapped):
    iam = boto3.client("iam")
    head = bootstrapped["available_node_types"][bootstrapped["head_node_type"]]
    head_role = head["node_config"]["IamInstanceProfile"]["Name"]
    statements = [
        statement
        for policy in iam.list_role_policies(RoleName=head_role)["PolicyNames"]
        for statement in iam.get_role_policy(RoleName=head_role, PolicyName=policy)["PolicyDocument"][
            "Statement"
        ]
    ]
    assert _rays_ec2_actions() <= _allowed(statements, "*")

    worker_profiles = {
        node_type["node_config"]["IamInstanceProfile"]["Name"]
        for name, node_type in bootstrapped["available_node_types"].items()
        if name != bootstrapped["head_node_type"]
    }
    for profile in worker_profiles:
        role_arn = iam.get_role(RoleName=profile)["Role"]["Arn"]
        assert "iam:PassRole" in _allowed(statements, role_arn), role_arn


def test_both_roles_read_and_write_the_named_bucket_and_no_other(aws):
    """S3 signed as each node's role, with moto enforcing IAM; the policy is also what IRSA gets."""
    s3 = boto3.client("s3", region_name="us-west-2")
    for bucket in (BUCKET, "someone-elses"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    printed = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "aws_iam.py"), "--bucket", BUCKET, "--print-s3-policy"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    credentials = {role: _assume(role) for role in ("mask-rcnn-ray-head", "mask-rcnn-ray-worker")}
    for role in credentials:
        attached = boto3.client("iam").get_role_policy(RoleName=role, PolicyName="s3")["PolicyDocument"]
        assert attached == json.loads(printed)

    requests.post(f"{aws}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        for role, keys in credentials.items():
            node_s3 = boto3.client("s3", region_name="us-west-2", **keys)
            node_s3.put_object(Bucket=BUCKET, Key=f"runs/{role}.json", Body=b"{}")
            assert node_s3.get_object(Bucket=BUCKET, Key=f"runs/{role}.json")["Body"].read() == b"{}"
            assert node_s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["KeyCount"] >= 1
            with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
                node_s3.put_object(Bucket="someone-elses", Key="x", Body=b"")
    finally:
        requests.post(f"{aws}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_the_head_role_may_launch_tag_list_and_terminate_workers(aws, bootstrapped):
    """Ray's AWS node provider, signed as the head role, with moto enforcing IAM on every call.

    The worker role, which has no EC2 rights, is refused the same launch: the check is live.
    """
    ec2 = boto3.client("ec2", region_name="us-west-2")
    # moto does not resolve `resolve:ssm:` image ids: launch one of its own images instead.
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    worker_type = next(name for name in bootstrapped["available_node_types"] if name != "head")
    node_config = {**bootstrapped["available_node_types"][worker_type]["node_config"], "ImageId": image}
    head_credentials = _assume("mask-rcnn-ray-head")
    worker_credentials = _assume("mask-rcnn-ray-worker")

    requests.post(f"{aws}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        provider = _provider(bootstrapped, head_credentials)
        tags = {"ray-node-type": "worker", "ray-user-node-type": worker_type}
        created = provider.create_node(node_config, tags, 1)
        [node_id] = created
        assert provider.non_terminated_nodes({"ray-user-node-type": worker_type}) == [node_id]
        provider.set_node_tags(node_id, {"ray-node-status": "up-to-date"})
        provider._update_node_tags()
        assert node_provider.list_ec2_instances("us-west-2", head_credentials)
        provider.terminate_node(node_id)

        with pytest.raises(NodeLaunchException, match="not authorized to perform: ec2:RunInstances"):
            _provider(bootstrapped, worker_credentials).create_node(node_config, tags, 1)
    finally:
        requests.post(f"{aws}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def _rays_ec2_actions() -> set[str]:
    """`ec2:<Api>` for every EC2 API that Ray 2.60's AWS node provider calls, read from its source.

    Client methods (called, or kept to call later) are found by attribute name in boto3's own
    method-to-API table; the two resource calls
    (`create_instances`, `instances.filter`) map to RunInstances and DescribeInstances.
    """
    source = Path(node_provider.__file__).read_text()
    api = boto3.client("ec2", region_name="us-west-2").meta.method_to_api_mapping
    called = {api[name] for name in re.findall(r"\.(\w+)\b", source) if name in api}
    resource_calls = {"RunInstances": ".create_instances(", "DescribeInstances": ".instances.filter("}
    called |= {action for action, call in resource_calls.items() if call in source}
    assert {"RunInstances", "TerminateInstances", "CreateTags"} <= called, "Ray's provider changed shape"
    return {f"ec2:{action}" for action in called}


def _allowed(statements: list[dict], resource_arn: str) -> set[str]:
    """The actions that Allow statements grant on `resource_arn` (wildcards as IAM matches them)."""
    allowed = set()
    for statement in statements:
        resources = _as_list(statement["Resource"])
        if statement["Effect"] == "Allow" and any(fnmatch.fnmatchcase(resource_arn, r) for r in resources):
            allowed |= set(_as_list(statement["Action"]))
    return allowed


def _as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _assume(role_name: str) -> dict[str, str]:
    """Temporary credentials of `role_name`, as an instance with its profile gets them."""
    arn = boto3.client("iam").get_role(RoleName=role_name)["Role"]["Arn"]
    credentials = boto3.client("sts", region_name="us-west-2").assume_role(
        RoleArn=arn, RoleSessionName="test"
    )["Credentials"]
    return {
        "aws_access_key_id": credentials["AccessKeyId"],
        "aws_secret_access_key": credentials["SecretAccessKey"],
        "aws_session_token": credentials["SessionToken"],
    }


def _provider(config: dict, credentials: dict[str, str]) -> node_provider.AWSNodeProvider:
    return node_provider.AWSNodeProvider(
        {**config["provider"], "aws_credentials": credentials}, config["cluster_name"]
    )


def _wait_until_up(endpoint: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(f"{endpoint}/moto-api/", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.5)
    raise RuntimeError("moto did not start within 60 s")

