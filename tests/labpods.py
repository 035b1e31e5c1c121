"""Manifests shared by test modules: a second meshed identity (``ambient/other``, one pod) and one
more backend of the client-server scenario's ``ambient/server`` Service."""

from __future__ import annotations


def other_pod(node: str, ip: str) -> str:
    """ServiceAccount ``ambient/other`` and its pod ``other-7d9f8c6b5-x2k4p`` on ``node`` (port 8080)."""
    return f"""---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: other, namespace: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: other-7d9f8c6b5-x2k4p
  namespace: ambient
  uid: d3000000-0000-4000-8000-0000000000a1
  labels: {{app: other}}
  creationTimestamp: '2022-10-01T00:00:00Z'
spec:
  nodeName: {node}
  serviceAccountName: other
  containers: [{{name: other, image: example/app, ports: [{{containerPort: 8080}}]}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: 'True'}}]
"""


NEW_SERVER_POD = "ambient/server-f44ffdf6f-new01"


def new_server_pod(node: str, ip: str, ready: bool = True) -> str:
    """One more ``app: server`` pod (port 8080) on ``node``: a new endpoint of ``ambient/server``."""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: server-f44ffdf6f-new01, namespace: ambient, uid: d3000000-0000-4000-8000-0000000000aa, labels: {{app: server}},
           creationTimestamp: '2022-10-01T00:00:00Z'}}
spec:
  nodeName: {node}
  serviceAccountName: server
  containers: [{{name: server, image: example/app, ports: [{{containerPort: 8080, name: http, protocol: TCP}}]}}]
status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: '{ready}'}}]}}
"""
