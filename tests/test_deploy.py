"""Deployment files: every manifest validates, and the pod template matches the config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tiered import config_from_mapping

from conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.32"  # native sidecars (initContainer restartPolicy: Always) need 1.29+


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "JobSet":
        return [rj["template"]["spec"]["template"]["spec"] for rj in doc["spec"]["replicatedJobs"]]
    return []


@pytest.mark.parametrize("path", all_manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates(path: Path) -> None:
    for doc in docs(path):
        if doc["kind"] == "JobSet":
            # No schema ships for the JobSet CRD: validate each embedded Job template as a Job.
            for rj in doc["spec"]["replicatedJobs"]:
                job = {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": rj["name"]},
                    "spec": rj["template"]["spec"],
                }
                kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        elif "patch" in path.name:
            # A kustomize patch is a partial object; it must still name a real resource kind.
            assert doc["kind"] and doc["metadata"]["name"]
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def config_for(overlay: str | None) -> dict[str, Any]:
    path = (K8S / "overlays" / overlay if overlay else K8S / "base") / "tiered.yml"
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("manifest", ["job.yaml", "jobset.yaml"])
@pytest.mark.parametrize("overlay", [None, "gcs", "s3"])
def test_pod_template_matches_config(manifest: str, overlay: str | None) -> None:
    raw = config_for(overlay)
    cfg = config_from_mapping(raw, env={})
    port = int(cfg.tiered.status_address.rpartition(":")[2])
    for spec in pod_specs(docs(K8S / "base" / manifest)[0]):
        sidecar = next(c for c in spec["initContainers"] if c["name"] == "tiered-daemon")
        trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
        assert sidecar["restartPolicy"] == "Always"  # a native sidecar
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports["status"] == port and set(ports) <= {"status", "peers"}
        # liveness is the daemon's loop; readiness is the store's health
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
        config_arg = sidecar["args"][sidecar["args"].index("--config") + 1]
        assert config_arg == trainer["args"][trainer["args"].index("--config") + 1]
        for container in (sidecar, trainer):
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert config_arg.startswith(mounts["config"] + "/")
            # both containers see the local tier at the path the config names
            assert str(cfg.local_dir).startswith(mounts["local-ssd"] + "/")
        assert spec["securityContext"]["runAsNonRoot"] is True
        # the preStop wait plus the daemon's drain fit in the pod's grace period
        command = sidecar["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["tiered", "status"] and config_arg in command
        wait = float(command[command.index("--wait-settled") + 1])
        assert wait + cfg.tiered.shutdown_grace_seconds < spec["terminationGracePeriodSeconds"]


def test_overlays_point_at_their_backend() -> None:
    assert config_for("gcs")["checkpoint_dir"].startswith("gs://")
    assert config_for("s3")["checkpoint_dir"].startswith("s3://")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["gcs", "s3"])
def test_kustomize_builds_and_validates(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert {d["kind"] for d in built} == {"ServiceAccount", "ConfigMap", "NetworkPolicy", "Job"}
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    configmap = next(d for d in built if d["kind"] == "ConfigMap")
    assert (
        configmap["data"]["tiered.yml"] == (K8S / "overlays" / overlay / "tiered.yml").read_text()
    )


def test_daemon_image_is_slim_and_non_root() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and all("jax" not in line for line in installs)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    trainer = (ROOT / "deploy" / "Dockerfile.trainer").read_text()
    assert re.findall(r"^USER\s+(\S+)", trainer, re.M)[-1].split(":")[0] not in ("root", "0")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "systemd" / "tiered-daemon.service").read_text()
    assert "Restart=on-failure" in unit and "NoNewPrivileges=yes" in unit
    # Point ExecStart at this checkout's tiered, since systemd checks the binary exists.
    tiered_bin = Path(sys.executable).parent / "tiered"
    local = tmp_path / "tiered-daemon.service"
    local.write_text(re.sub(r"ExecStart=\S+", f"ExecStart={tiered_bin}", unit))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line for line in (out.stdout + out.stderr).splitlines() if "tiered-daemon.service" in line
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_jobset_gives_every_host_the_same_shape() -> None:
    """Each host's daemon and trainer agree on its rank, and the node count is the host count:
    a mismatch would mix nodes' files or make the trainer refuse to start."""
    jobset = docs(K8S / "base" / "jobset.yaml")[0]
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    spec = job["template"]["spec"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "tiered-daemon")
    trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
    envs = [{e["name"]: e for e in c["env"]} for c in (sidecar, trainer)]
    for env in envs:
        assert int(env["TIERED_NUM_NODES"]["value"]) == job["parallelism"] == job["completions"]
        assert (
            "job-completion-index" in env["TIERED_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
        )
    assert envs[0]["TIERED_NODE_RANK"] == envs[1]["TIERED_NODE_RANK"]
    assert "--distributed" in trainer["args"]


@pytest.mark.parametrize(
    "path",
    [K8S / "base" / "job.yaml", K8S / "base" / "jobset.yaml", K8S / "maxtext" / "jobset.yaml"],
)
def test_the_sidecar_knows_the_local_volume_limit(path: Path) -> None:
    """tiered.local_capacity equals the emptyDir sizeLimit: free space is measured against
    what the kubelet enforces, not the node's disk."""
    from tiered.config import parse_bytes

    for doc in docs(path):
        for spec in pod_specs(doc):
            volume = next(v for v in spec["volumes"] if v["name"] == "local-ssd")
            sidecar = next(c for c in spec["initContainers"] if c["name"] == "tiered-daemon")
            env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
            assert parse_bytes(env["TIERED_LOCAL_CAPACITY"]) == parse_bytes(
                volume["emptyDir"]["sizeLimit"]
            )


PROMETHEUS = ROOT / "deploy" / "prometheus"


def test_alert_rules_use_only_metrics_the_daemon_exports() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from daemon.metrics import Metrics

    exported = set()
    for family in text_string_to_metric_families(Metrics().render().decode()):
        exported |= {family.name, *(s.name for s in family.samples)}
    rules = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {
        "TieredDurableTierStale",
        "TieredBacklogGrowing",
        "TieredDaemonDegraded",
    }
    for rule in rules:
        used = set(re.findall(r"\btiered_[a-z_]+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run(
            [promtool, "check", "rules", str(PROMETHEUS / "alerts.yaml")], capture_output=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_podmonitor_selects_the_pods_and_their_status_port() -> None:
    (monitor,) = docs(PROMETHEUS / "podmonitor.yaml")
    (job,) = [d for d in docs(K8S / "base" / "job.yaml") if d["kind"] == "Job"]
    template = job["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {
        p["name"]
        for c in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]
        for p in c.get("ports", [])
    }
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def test_the_network_policy_lets_the_job_reach_its_own_coordinator() -> None:
    """Applied with the JobSet, the policy must not cut the workers off from the JAX
    coordinator (and the collectives, on ports chosen at run time)."""
    (policy,) = docs(K8S / "base" / "networkpolicy.yaml")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    peer_rules = [
        rule
        for rule in policy["spec"]["ingress"]
        if any(src.get("podSelector", {}).get("matchLabels") == selected for src in rule["from"])
    ]
    # one rule lets them reach each other on every port (the collectives pick theirs)
    assert peer_rules and any("ports" not in rule for rule in peer_rules)
    (jobset,) = docs(K8S / "base" / "jobset.yaml")
    for rj in jobset["spec"]["replicatedJobs"]:
        pod_labels = rj["template"]["spec"]["template"]["metadata"]["labels"]
        assert selected.items() <= pod_labels.items()
        env = {
            e["name"]: e.get("value")
            for c in rj["template"]["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", [])
        }
        assert env.get("JAX_COORDINATOR_ADDRESS", "").endswith(":1234")


def test_images_are_set_in_one_place() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    named = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].rsplit(":", 1)[0]
        for path in (K8S / "base" / "job.yaml", K8S / "base" / "jobset.yaml")
        for doc in docs(path)
        for spec in pod_specs(doc)
        for c in [*spec.get("initContainers", []), *spec["containers"]]
    }
    assert used and used <= named


@pytest.mark.parametrize("path", [K8S / "base" / "jobset.yaml", K8S / "maxtext" / "jobset.yaml"])
def test_every_host_reaches_its_peers_with_the_secret(path: Path) -> None:
    """Peer replication in the JobSet: the addresses are the headless service's names of this
    JobSet's pods, on the port the daemon exposes; the daemon (and the native trainer, which
    gets its steps back itself) reads the secret from a mounted Secret; the network policy
    opens the peer port to the job's own pods only."""
    from tiered.peering import listen_address, peer_address

    jobset = next(d for d in docs(path) if d["kind"] == "JobSet")
    name = jobset["metadata"]["name"]
    rj = jobset["spec"]["replicatedJobs"][0]
    spec = rj["template"]["spec"]["template"]["spec"]
    nodes = rj["template"]["spec"]["parallelism"]
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "tiered-daemon")
    readers = [sidecar]
    if path.parent.name == "base":
        readers.append(next(c for c in spec["containers"] if c["name"] == "trainer"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in readers:
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        cfg = config_from_mapping(
            {
                "checkpoint_dir": "gs://b/c",
                "local_checkpoint_directory": "/local",
                "tiered": {"num_nodes": nodes},
            },
            env=env,
        )
        assert cfg.peering
        addresses = [peer_address(cfg, r, nodes) for r in range(nodes)]
        assert addresses[3] == f"{name}-{rj['name']}-0-3.{name}:8478"
        mount = next(m for m in container["volumeMounts"] if m["name"] == "peer-secret")
        assert env["TIERED_PEER_SECRET_FILE"].startswith(mount["mountPath"] + "/")
        assert mount["readOnly"]
        assert volumes["peer-secret"]["secret"]["secretName"] == "tiered-peer-secret"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert listen_address(cfg, 0, nodes) == f"0.0.0.0:{ports['peers']}"
    (policy,) = docs(K8S / "base" / "networkpolicy.yaml")
    own = policy["spec"]["podSelector"]["matchLabels"]
    rules = [
        r
        for r in policy["spec"]["ingress"]
        if {"port": 8478, "protocol": "TCP"} in r.get("ports", [])
    ]
    assert rules and all(
        src == {"podSelector": {"matchLabels": own}} for r in rules for src in r["from"]
    ), "the peer port takes the job's own pods, nobody else"
    assert not any(
        "namespaceSelector" in src and "ports" not in r
        for r in policy["spec"]["ingress"]
        for src in r["from"]
    )


GRAFANA = ROOT / "deploy" / "grafana"


def grafana_configmaps() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/grafana` creates: kustomize's own build where kubectl is
    installed, else the same ConfigMaps made here from the configMapGenerator entries."""
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", str(GRAFANA)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kustomization = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    built = []
    for gen in kustomization["configMapGenerator"]:
        data = {}
        for entry in gen["files"]:
            key, _, name = entry.rpartition("=")
            data[key or name] = (GRAFANA / name).read_text()
        labels = gen.get("options", {}).get("labels", {})
        metadata = {"name": gen["name"], "labels": labels}
        built.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return built


def test_grafana_configmaps_validate_and_carry_the_dashboard() -> None:
    built = {d["metadata"]["name"]: d for d in grafana_configmaps()}
    assert set(built) == {"tiered-grafana-dashboard", "tiered-grafana-provisioning"}
    for doc in built.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dashboard = built["tiered-grafana-dashboard"]
    text = (GRAFANA / "tiered-dashboard.json").read_text()
    assert dashboard["data"] == {"tiered-dashboard.json": text}
    # the label Grafana's dashboard sidecar selects on (grafana Helm chart's default)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    # `kubectl apply` keeps the whole object in an annotation limited to 256 KiB
    assert len(text.encode()) < 256 * 1024
    provider = yaml.safe_load(built["tiered-grafana-provisioning"]["data"]["tiered.yaml"])
    (entry,) = provider["providers"]
    assert provider["apiVersion"] == 1 and entry["type"] == "file"
    assert entry["options"]["path"].startswith("/var/lib/grafana/dashboards")
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    assert f"mountPath: {entry['options']['path']}" in deploy_md  # the mount docs/deploy.md shows


def test_podmonitor_sets_the_labels_the_dashboard_groups_by() -> None:
    (monitor,) = docs(PROMETHEUS / "podmonitor.yaml")
    assert monitor["spec"]["jobLabel"] == "batch.kubernetes.io/job-name"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    node = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "node")
    assert node["sourceLabels"] == ["__meta_kubernetes_pod_node_name"]
    dashboard = (GRAFANA / "tiered-dashboard.json").read_text()
    assert 'job=~\\"$job\\"' in dashboard and 'node=~\\"$node\\"' in dashboard
