"""Create the two instance profiles cluster.yaml names, from the policies in deploy/aws/.

    python deploy/aws_iam.py --bucket my-bucket [--bucket my-other-bucket]
    python deploy/aws_iam.py --bucket my-bucket --print-s3-policy   # the S3 policy alone, for IRSA

- `mask-rcnn-ray-head`: what Ray's autoscaler on the head calls (run, tag, describe, stop and
  terminate instances; pass the worker role to the instances it launches), plus the buckets.
- `mask-rcnn-ray-worker`: the buckets only.

Run it once per AWS account with credentials that may manage IAM; running it again updates the
policies (e.g. to add a bucket) and leaves the rest as it is. It prints the profiles' ARNs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import boto3

POLICIES = Path(__file__).resolve().parent / "aws"
HEAD = "mask-rcnn-ray-head"
WORKER = "mask-rcnn-ray-worker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python deploy/aws_iam.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bucket", action="append", required=True, help="an S3 bucket the jobs read or write (repeat)"
    )
    parser.add_argument(
        "--print-s3-policy",
        action="store_true",
        help="print the S3 policy JSON for these buckets and create nothing (for a KubeRay IRSA role)",
    )
    return parser


def s3_policy(buckets: list[str]) -> dict:
    """deploy/aws/s3-policy.json with its BUCKET placeholder expanded to each bucket."""
    policy = _load("s3-policy.json")
    for statement in policy["Statement"]:
        statement["Resource"] = [
            resource.replace("BUCKET", bucket) for resource in statement["Resource"] for bucket in buckets
        ]
    return policy


def create_profiles(buckets: list[str], iam=None) -> dict[str, str]:
    """Create or update both roles and instance profiles; returns {profile name: ARN}."""
    iam = iam or boto3.client("iam")
    inline = {
        HEAD: {"autoscaler": _load("head-policy.json"), "s3": s3_policy(buckets)},
        WORKER: {"s3": s3_policy(buckets)},
    }
    arns = {}
    for name, policies in inline.items():
        _ignore_existing(
            iam, iam.create_role, RoleName=name, AssumeRolePolicyDocument=json.dumps(_load("ec2-trust.json"))
        )
        for policy_name, document in policies.items():
            iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document))
        _ignore_existing(iam, iam.create_instance_profile, InstanceProfileName=name)
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        if not any(role["RoleName"] == name for role in profile["Roles"]):
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        arns[name] = profile["Arn"]
    return arns


def _ignore_existing(iam, create, **kwargs) -> None:
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        create(**kwargs)


def _load(name: str) -> dict:
    return json.loads((POLICIES / name).read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_s3_policy:
        print(json.dumps(s3_policy(args.bucket), indent=2))
        return 0
    for name, arn in create_profiles(args.bucket).items():
        print(f"{name}: {arn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
