"""k8s/: every kustomization renders with kubectl's kustomize, validates offline against the Kubernetes
schemas with unknown fields rejected, and agrees with the image and the server it runs."""

from __future__ import annotations

import shlex

import kubernetes_validate
import pytest
import yaml
from _deploy import (
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    blip2_env_keys,
    container,
    find,
    image_config,
    pod_spec,
    render,
    serves,
    settings_fields,
    settings_from_env,
)

SERVING = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/keda"]
TRAINING = ["k8s/training/single-node", "k8s/training/multi-node"]
# Custom resources whose schemas kubernetes-validate does not ship; checked field by field below.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
NAMESPACE = "blip2"
GPU = "nvidia.com/gpu"


def _schema_error(error: Exception) -> str:
    # kubernetes-validate's message quotes the whole schema; the first lines say what and where.
    return "\n".join(str(error).splitlines()[:3])


def test_every_kustomization_is_tested():
    found = sorted(
        str(path.parent.relative_to(K8S.parent))
        for path in K8S.rglob("kustomization.yaml")
        if yaml.safe_load(path.read_text())["kind"] == "Kustomization"
    )
    assert found == sorted(KUSTOMIZATIONS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate_strictly(kustomization, version):
    docs = render(kustomization)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']}: {_schema_error(error)}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_namespace_and_every_reference_resolves(kustomization):
    docs = render(kustomization)
    for doc in docs:
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "blip2-stack"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for workload in (d for d in docs if d["kind"] in ("Deployment", "Job")):
        spec = pod_spec(workload)
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= mounted
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            for var in c.get("env", []):
                secret = var.get("valueFrom", {}).get("secretKeyRef")
                if secret:
                    # Made by hand (docs/DEPLOY.md, Kubernetes); optional, so pods start without it.
                    assert secret["name"] == "blip2-secrets" and secret["optional"] is True


def _server(kustomization):
    docs = render(kustomization)
    deployment = find(docs, "Deployment", "blip2-server")
    return docs, deployment, container(deployment, "server")


def _config_env(docs, c) -> dict[str, str]:
    env = {}
    for source in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


@pytest.mark.parametrize("kustomization", SERVING)
def test_probes_hit_the_servers_real_routes(kustomization):
    _, _, c = _server(kustomization)
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert serves("GET", get["path"]), get
        assert get["port"] == "http"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


@pytest.mark.parametrize("kustomization", SERVING)
def test_port_is_the_one_the_server_and_image_use(kustomization):
    docs, _, c = _server(kustomization)
    settings = settings_from_env(_config_env(docs, c))
    port = c["ports"][0]["containerPort"]
    assert settings.port == port
    assert image_config("gpu")["ExposedPorts"] == [str(port)]
    service = find(docs, "Service", "blip2-server")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("kustomization", SERVING)
def test_startup_budget_covers_model_loading(kustomization):
    _, deployment, c = _server(kustomization)
    probe = c["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    gpu = GPU in c["resources"].get("limits", {})
    # A 2.7B model downloads and loads in minutes; the packaged CPU model in seconds.
    assert budget >= (15 * 60 if gpu else 2 * 60), budget
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] <= 60


@pytest.mark.parametrize("kustomization", SERVING)
def test_termination_leaves_time_for_the_drain(kustomization):
    docs, deployment, c = _server(kustomization)
    settings = settings_from_env(_config_env(docs, c))
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = int(pre_stop[1])
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_s + settings.drain_timeout_s + 10, (grace, pre_stop_s, settings.drain_timeout_s)
    # The drain must also fit the readiness probe: /ready turns 503 at SIGTERM.
    assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] < grace


@pytest.mark.parametrize("kustomization", SERVING)
def test_settings_come_from_a_configmap_the_server_accepts(kustomization):
    docs, _, c = _server(kustomization)
    env = _config_env(docs, c)
    assert blip2_env_keys(env) <= settings_fields(), blip2_env_keys(env) - settings_fields()
    settings = settings_from_env(env)
    gpu = GPU in c["resources"].get("limits", {})
    if gpu:
        assert settings.device == "cuda" and settings.load_in_8bit is True
        assert settings.model == "Salesforce/blip2-opt-2.7b"
    else:
        assert settings.device == "cpu"
        assert "BLIP2_MODEL" not in env, "the CPU image serves its packaged default model"
    secrets = {v["name"] for v in c["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    assert secrets == {"HF_TOKEN", "BLIP2_API_KEY"}
    assert "api_key" in settings_fields()


@pytest.mark.parametrize("kustomization", SERVING)
def test_pod_security_and_writable_paths(kustomization):
    docs, deployment, c = _server(kustomization)
    spec = pod_spec(deployment)
    variant = "gpu" if GPU in c["resources"].get("limits", {}) else "cpu"
    image = image_config(variant)
    uid, _, gid = image["User"].partition(":")
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (
        int(uid),
        int(gid),
        int(gid),
    )
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    assert c["image"] == f"blip2-stack:{variant}"
    # Read-only root: every place the server writes is a volume.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in (image["Env"]["HF_HOME"], "/tmp", "/home/blip2"):
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    cache = volumes[mounts["/cache"]]
    if variant == "gpu":
        claim = find(docs, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "replicas on several nodes share the cache"
    else:
        assert "emptyDir" in cache and not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


@pytest.mark.parametrize("kustomization", SERVING)
def test_gpu_is_requested_whole_and_only_where_used(kustomization):
    _, _, c = _server(kustomization)
    limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
    assert "memory" in limits and "cpu" in requests and "memory" in requests
    if kustomization == "k8s/overlays/cpu":
        assert GPU not in limits and GPU not in requests
    else:
        assert limits[GPU] == requests[GPU] == 1


@pytest.mark.parametrize("kustomization", SERVING)
def test_service_and_pdb_select_the_server_pods(kustomization):
    docs, deployment, _ = _server(kustomization)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(docs, "Service", "blip2-server")
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1, "a single replica must not block node drains"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert serves("GET", annotations["prometheus.io/path"])
    assert int(annotations["prometheus.io/port"]) == container(deployment)["ports"][0]["containerPort"]


def _hpa_metric(docs) -> str:
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "blip2-server",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    return metric["pods"]["metric"]["name"]


@pytest.mark.parametrize("kustomization", ["k8s/base", "k8s/overlays/cpu"])
def test_hpa_scales_on_the_queue_depth_the_adapter_publishes(kustomization):
    docs = render(kustomization)
    metric = _hpa_metric(docs)
    assert metric == "blip2_queue_depth"
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert rule["name"]["as"] == metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_keda_overlay_replaces_the_hpa_with_a_scaled_object():
    docs = render("k8s/overlays/keda")
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns the HPA"
    scaled = find(docs, "ScaledObject", "blip2-server")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "blip2-server"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(blip2_queue_depth{"), "one value: the queue summed over the pods"
    assert f'namespace="{NAMESPACE}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0
    base_hpa = find(render("k8s/base"), "HorizontalPodAutoscaler")
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == base_hpa["spec"]["behavior"]
    assert spec["maxReplicaCount"] == base_hpa["spec"]["maxReplicas"]


# ---------------------------------------------------------------------------------------------
# Training Jobs


def _torchrun(job, node_rank="0"):
    """Split a trainer's argv into torchrun's parsed options and the training CLI's arguments."""
    from torch.distributed.run import get_args_parser

    c = container(job, "trainer")
    assert c["command"] == ["torchrun"]
    args = [a.replace("$(NODE_RANK)", node_rank) for a in c["args"]]
    parsed = get_args_parser().parse_args(args)
    assert parsed.module and parsed.training_script == "training.cli"
    return parsed, parsed.training_script_args


def _recipe_settings(docs, job, cli_args, tmp_path):
    """Load the recipe exactly as `blip2-train` does, from the ConfigMap mounted at /config."""
    from training.cli import _settings_from, build_parser

    spec = pod_spec(job)
    c = container(job, "trainer")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/config")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    recipe = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]["recipe.yaml"]
    local = tmp_path / "recipe.yaml"
    local.write_text(recipe)
    config_at = cli_args.index("--config") + 1
    assert cli_args[config_at] == "/config/recipe.yaml"
    args = build_parser().parse_args([*cli_args[:config_at], str(local), *cli_args[config_at + 1 :]])
    return _settings_from(args, args.settings_class)


@pytest.mark.parametrize("kustomization", TRAINING)
def test_training_job_runs_blip2_train_under_torchrun(kustomization, tmp_path):
    docs = render(kustomization)
    job = find(docs, "Job")
    parsed, cli_args = _torchrun(job)
    assert parsed.nproc_per_node == "gpu", "one worker per GPU the pod is given: N lives in the GPU limit"
    assert cli_args[0] == "stage1"
    settings = _recipe_settings(docs, job, cli_args, tmp_path)
    assert settings.resume is True, "a rerun pod continues from the last checkpoint"
    assert settings.output.startswith("/checkpoints/")
    assert all(shard.startswith("/data/") for shard in settings.shards.split(","))
    c = container(job, "trainer")
    limits = c["resources"]["limits"]
    assert limits[GPU] == c["resources"]["requests"][GPU] >= 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True and not mounts["/checkpoints"].get("readOnly")
    env = find(docs, "ConfigMap", c["envFrom"][0]["configMapRef"]["name"])["data"]
    assert env["HF_HOME"].startswith("/checkpoints/"), "the frozen parts download once, onto a volume"
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    image = image_config("gpu", target="train")
    assert spec["securityContext"]["runAsUser"] == int(image["User"].split(":")[0])
    shm = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"]["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    assert c["image"] == "blip2-stack:gpu-train", "the training image (docker/Dockerfile --target train)"


def test_single_node_job_is_standalone():
    job = find(render("k8s/training/single-node"), "Job")
    parsed, _ = _torchrun(job)
    assert parsed.standalone and parsed.nnodes == "1"
    assert "completionMode" not in job["spec"]


def test_multi_node_job_rendezvous_is_consistent():
    docs = render("k8s/training/multi-node")
    job = find(docs, "Job")
    spec = job["spec"]
    parsed, _ = _torchrun(job, node_rank="1")
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(parsed.nnodes) >= 2
    assert not parsed.standalone
    # Pod 0 of an Indexed Job is <job>-0; with the headless Service as subdomain it resolves as
    # <job>-0.<service>.
    service = find(docs, "Service", pod_spec(job)["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert parsed.master_addr == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert parsed.master_port in [p["port"] for p in service["spec"]["ports"]]
    c = container(job, "trainer")
    assert parsed.master_port in [p["containerPort"] for p in c["ports"]]
    rank = next(v for v in c["env"] if v["name"] == "NODE_RANK")
    field_path = rank["valueFrom"]["fieldRef"]["fieldPath"]
    assert field_path == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert "--node_rank=$(NODE_RANK)" in c["args"]


def test_both_jobs_run_the_same_training_command():
    single = container(find(render("k8s/training/single-node"), "Job"))
    multi = container(find(render("k8s/training/multi-node"), "Job"))
    tail = shlex.join(single["args"][single["args"].index("-m") :])
    assert tail == shlex.join(multi["args"][multi["args"].index("-m") :])
