"""deploy/kuberay/ holds RayJobs that KubeRay can run: pods Kubernetes accepts, workers that start.

Pod templates go through the `kubernetes` client's own models (`V1PodTemplateSpec`): a field the
model does not know is dropped there, so a template that does not come back whole names a field
Kubernetes would reject. The RayJob and RayCluster fields are checked against the names in
KubeRay's v1 CRD (ray.io_rayjobs.yaml, KubeRay 1.6/1.7), listed below.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))

# Field names of KubeRay's RayJob v1 CRD (spec.properties and below).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
    "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "managedBy", "networkPolicy", "rayVersion",
    "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
    "serviceType", "template",
}  # fmt: skip
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
    "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
    "resources", "securityContext", "upscalingMode", "version", "volumeMounts",
}  # fmt: skip
AUTH_OPTIONS = {"enableK8sTokenAuth", "mode", "secretName"}


def _documents() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _rayjobs() -> list[dict]:
    return [doc for doc in _documents() if doc["kind"] == "RayJob"]


def _pod_templates(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in job["spec"]:
        templates.append(job["spec"]["submitterPodTemplate"])
    return templates


def test_there_is_a_rayjob_for_segmentation_and_one_for_training():
    modules = {shlex.split(job["spec"]["entrypoint"])[2] for job in _rayjobs()}
    assert modules == {"jobs.segment", "jobs.train"}


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_every_pod_template_is_a_valid_kubernetes_pod_template(job):
    client = ApiClient()
    for template in _pod_templates(job):
        model = client._ApiClient__deserialize(template, "V1PodTemplateSpec")
        assert client.sanitize_for_serialization(model) == _normalised(template)


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_rayjob_and_raycluster_fields_are_kuberays(job):
    assert job["apiVersion"] == "ray.io/v1"
    assert set(job["spec"]) <= RAYJOB_SPEC
    cluster = job["spec"]["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    assert set(cluster.get("authOptions", {})) <= AUTH_OPTIONS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_autoscaling_gpu_workers_start_for_the_job(job):
    """Autoscaling on, and a GPU group that can grow: the job's GPU requests get pods."""
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    [gpu] = [g for g in cluster["workerGroupSpecs"] if _limits(g["template"]).get("nvidia.com/gpu")]
    assert int(_limits(gpu["template"])["nvidia.com/gpu"]) >= 1
    assert 0 <= gpu["minReplicas"] <= gpu.get("replicas", 0) <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1
    entrypoint = job["spec"]["entrypoint"]
    # The job asks for GPUs, so the autoscaler has something to scale the GPU group for.
    assert "--use-gpu" in entrypoint or re.search(r"--gpus-per-actor [1-9]", entrypoint)


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_the_job_api_is_reachable_inside_the_cluster_only_and_requires_a_token(job):
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # KubeRay's submitter pod reaches the dashboard through the head Service: not 127.0.0.1.
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert cluster["authOptions"]["mode"] == "token"
    kinds = {doc["kind"] for doc in _documents()}
    assert not kinds & {"Service", "Ingress", "Gateway", "HTTPRoute"}


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_every_pod_reaches_s3_through_the_irsa_service_account(job):
    [account] = [doc for doc in _documents() if doc["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for template in _pod_templates(job):
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for container in template["spec"]["containers"]:
            names = {env["name"] for env in container.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_the_entrypoint_parses_with_its_jobs_own_parser(job):
    python, dash_m, module, *args = shlex.split(job["spec"]["entrypoint"])
    assert (python, dash_m) == ("python", "-m")
    importlib.import_module(module).build_parser().parse_args(args)


@pytest.mark.parametrize("job", _rayjobs(), ids=lambda job: job["metadata"]["name"])
def test_pods_run_the_image_the_dockerfile_builds_with_this_ray(job):
    """Every container runs the image README builds from the Dockerfile, on this Ray version."""
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    assert re.search(r"pip install .*\.\s*(&&|$)", dockerfile, re.MULTILINE)
    [built] = re.findall(r"docker build -t (\S+) \.", (REPO / "README.md").read_text())
    images = {c["image"] for t in _pod_templates(job) for c in t["spec"]["containers"]}
    assert images == {built}


def _limits(template: dict) -> dict:
    [container] = [c for c in template["spec"]["containers"] if c["name"] == "ray-worker"]
    return container["resources"]["limits"]


def _normalised(template: dict) -> dict:
    """`template` as the client serialises it: quantities as strings, through JSON."""
    return json.loads(json.dumps(template))
