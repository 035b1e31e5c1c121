{{/* Names, labels and shared fragments. Kept here so the control plane and the ztunnel agree. */}}

{{- define "xdsserver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Control-plane name: also the Service the ztunnels dial, so it is stable across upgrades. */}}
{{- define "xdsserver.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "xdsserver.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xdsserver.commonLabels" -}}
helm.sh/chart: {{ include "xdsserver.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xdsserver
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "xdsserver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xdsserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "xdsserver.labels" -}}
{{ include "xdsserver.commonLabels" . }}
{{ include "xdsserver.selectorLabels" . }}
{{- end }}

{{- define "xdsserver.ztunnel.selectorLabels" -}}
app.kubernetes.io/name: {{ .Values.ztunnel.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ztunnel
{{- end }}

{{- define "xdsserver.ztunnel.labels" -}}
{{ include "xdsserver.commonLabels" . }}
{{ include "xdsserver.ztunnel.selectorLabels" . }}
{{- end }}

{{- define "xdsserver.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "xdsserver.ztunnel.image" -}}
{{- printf "%s:%s" .Values.ztunnel.image.repository .Values.ztunnel.image.tag }}
{{- end }}

{{/* DNS name of the control-plane Service: the ztunnel's xDS target, TLS SNI and expected SAN. */}}
{{- define "xdsserver.serviceHost" -}}
{{- printf "%s.%s.svc" (include "xdsserver.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Name of the Secret holding root-cert.pem/root-key.pem, or "" when xdsserver keeps its own. */}}
{{- define "xdsserver.caSecretName" -}}
{{- if .Values.ca.existingSecret }}
{{- .Values.ca.existingSecret }}
{{- else if .Values.ca.generate }}
{{- printf "%s-cacerts" (include "xdsserver.fullname" .) }}
{{- end }}
{{- end }}

{{/* ConfigMap with root-cert.pem only: the ztunnels' trust anchor for xdsserver. */}}
{{- define "xdsserver.rootCertConfigMapName" -}}
{{- if .Values.ca.existingSecret }}
{{- .Values.ca.existingRootConfigMap }}
{{- else }}
{{- printf "%s-root-cert" (include "xdsserver.fullname" .) }}
{{- end }}
{{- end }}

{{- define "xdsserver.ztunnel.configMapName" -}}
{{- printf "%s-bootstrap" .Values.ztunnel.name }}
{{- end }}

{{/* The mesh config file (contract of `xdsserver serve --mesh-config`). */}}
{{- define "xdsserver.meshConfig" -}}
trustDomain: {{ .Values.mesh.trustDomain | quote }}
clusterDomain: {{ .Values.mesh.clusterDomain | quote }}
enrollment:
  namespaceLabel:
    key: {{ .Values.mesh.enrollment.namespaceLabel.key | quote }}
    value: {{ .Values.mesh.enrollment.namespaceLabel.value | quote }}
  {{- if kindIs "slice" .Values.mesh.enrollment.excludedNamespaces }}
  excludedNamespaces: {{ .Values.mesh.enrollment.excludedNamespaces | toJson }}
  {{- end }}
connectTimeout: {{ .Values.mesh.connectTimeout | quote }}
outboundTrafficPolicy: {{ .Values.mesh.outboundTrafficPolicy | quote }}
{{- end }}

{{/* Checks the schema cannot express (cross-field rules). */}}
{{- define "xdsserver.validate" -}}
{{- if and (gt (int .Values.replicas) 1) (not (include "xdsserver.caSecretName" .)) }}
{{- fail "ca: replicas > 1 needs a shared root: set ca.existingSecret or ca.generate=true (with ca.generate=false every replica would mint its own root)" }}
{{- end }}
{{- if not (include "xdsserver.caSecretName" .) }}
{{- fail "ca: ca.generate=false needs ca.existingSecret: the ztunnels must know the root certificate before they first contact xdsserver, and a root minted inside the control-plane pod cannot reach them" }}
{{- end }}
{{- if and .Values.ca.existingSecret (not .Values.ca.existingRootConfigMap) }}
{{- fail "ca: ca.existingSecret needs ca.existingRootConfigMap: a ConfigMap with key root-cert.pem (the same root certificate, without its key) that the ztunnels mount; they must never mount the CA Secret" }}
{{- end }}
{{- end }}

{{/* Downward-API environment of every ztunnel container; Envoy's args expand these. */}}
{{- define "xdsserver.ztunnel.env" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: INSTANCE_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{- define "xdsserver.ztunnel.credentialsSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.ztunnel.credentials.runAsUser }}
runAsGroup: {{ .Values.ztunnel.credentials.runAsUser }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Data of the ztunnel ConfigMap; the DaemonSet's checksum covers exactly this (not labels). */}}
{{- define "xdsserver.ztunnel.configData" -}}
bootstrap.yaml: |
  {{- tpl (.Files.Get "files/bootstrap.yaml.tpl") . | trim | nindent 2 }}
sds-xds-client-cert.yaml: |
  {{- tpl (.Files.Get "files/sds-xds-client-cert.yaml.tpl") . | trim | nindent 2 }}
sds-xds-root-ca.yaml: |
  {{- tpl (.Files.Get "files/sds-xds-root-ca.yaml.tpl") . | trim | nindent 2 }}
{{- end }}

{{- define "xdsserver.nodeAgent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Values.nodeAgent.name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "xdsserver.nodeAgent.labels" -}}
{{ include "xdsserver.commonLabels" . }}
{{ include "xdsserver.nodeAgent.selectorLabels" . }}
{{- end }}

{{/* A label map as a Kubernetes label selector string: k=v,k2=v2 (sorted). */}}
{{- define "xdsserver.selectorString" -}}
{{- $out := list }}
{{- range $k := keys . | sortAlpha }}
{{- $out = append $out (printf "%s=%s" $k (index $ $k)) }}
{{- end }}
{{- join "," $out }}
{{- end }}
