"""No Kubernetes here: a kubeconfig that parses (NeMo-Run loads one when a Kubeflow executor is built)."""

from pathlib import Path

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}}]
contexts: [{name: test, context: {cluster: test, user: test}}]
current-context: test
users: [{name: test, user: {token: not-a-real-token}}]
"""


def write_kubeconfig(path: Path) -> Path:
    path.write_text(KUBECONFIG)
    return path
