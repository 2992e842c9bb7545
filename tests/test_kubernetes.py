"""deploy/kubernetes checked offline: kubectl builds it and decodes every object into its typed API object, and the
daemon's own config loader reads its ConfigMap; probes, ports and the grace period agree with that config.

Not checked here (it needs a cluster): fields kubectl's decoder does not know (they are dropped, not refused), the
API server's admission, the metrics adapter behind the autoscaler's metric, the images.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from streamer.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    """Every object of the kustomization, as kubectl builds it: (kind, name) -> object."""
    built = kubectl("kustomize", str(MANIFESTS))
    assert built.returncode == 0, built.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(built.stdout)}


@pytest.fixture(scope="module")
def config(objects) -> Config:
    """The daemons' streamer.toml, read by the daemon's loader (unknown keys and bad values raise)."""
    text = objects["ConfigMap", "streamer-config"]["data"]["streamer.toml"]
    return load_config(None, tomllib.loads(text))


def test_every_object_decodes_into_its_typed_api_object(objects, tmp_path):
    """kubectl decodes each object into its Go type (a wrong type, such as a number as a string, is refused);
    ``set image`` then applies to the workloads and says of every other object that it has no pod template."""
    path = tmp_path / "built.yaml"
    path.write_text(yaml.safe_dump_all(objects.values()))
    done = kubectl("set", "image", "--local", "-f", str(path), "*=checked", "-o", "name")
    decoded = [line for line in done.stderr.splitlines() if "does not have a pod template" in line]
    assert sorted(done.stdout.split()) == ["daemonset.apps/streamer-triton", "deployment.apps/streamer"]
    assert len(decoded) == len(objects) - 2, done.stderr
    assert "unable to decode" not in done.stderr and "unknown" not in done.stderr
    assert set(objects) == {("ConfigMap", "streamer-config"), ("Deployment", "streamer"), ("Service", "streamer"),
                            ("PodDisruptionBudget", "streamer"), ("HorizontalPodAutoscaler", "streamer"),
                            ("DaemonSet", "streamer-triton"), ("Service", "streamer-triton")}


def test_the_deployment_drains_within_its_grace_period(objects, config):
    pod = objects["Deployment", "streamer"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["streamer", "serve", "-c", "/etc/streamer/streamer.toml"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    s = config.server
    assert s.drain_timeout_s > 0
    # the kubelet's SIGKILL comes after the grace period, which the preStop hook's time counts in
    assert pod["terminationGracePeriodSeconds"] > (pre_stop + s.drain_timeout_s + s.shutdown_timeout_s
                                                   + config.mqtt.flush_timeout_s)
    rollout = objects["Deployment", "streamer"]["spec"]["strategy"]["rollingUpdate"]
    assert rollout == {"maxSurge": 1, "maxUnavailable": 0}


def test_probes_ports_and_scaling_agree_with_the_config(objects, config):
    (container,) = objects["Deployment", "streamer"]["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "streams", "containerPort": config.server.port}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "streams"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "streams"}
    assert config.server.host == "0.0.0.0"  # the kubelet probes the pod's address
    service = objects["Service", "streamer"]["spec"]
    assert service["ports"][0]["targetPort"] == "streams" and "sessionAffinity" not in service
    target = objects["HorizontalPodAutoscaler", "streamer"]["spec"]["metrics"][0]["pods"]
    assert target["metric"]["name"] == "streamer_streams_active"
    assert int(target["target"]["averageValue"]) == int(0.8 * config.server.max_streams)
    triton = objects["DaemonSet", "streamer-triton"]["spec"]["template"]["spec"]["containers"][0]
    grpc = next(p["containerPort"] for p in triton["ports"] if p["name"] == "grpc")
    assert config.model_server.kind == "triton" and config.model_server.url == f"streamer-triton:{grpc}"
    assert grpc == config.model_server.grpc_port
    assert objects["Service", "streamer-triton"]["spec"]["internalTrafficPolicy"] == "Local"
