{{/*
Chart name, truncated to 63 characters (the DNS-label limit of Kubernetes names).
*/}}
{{- define "kvpilot.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>", or just the release name when it already contains the chart
name, so that `helm install kvpilot ./kvpilot` does not yield "kvpilot-kvpilot".
*/}}
{{- define "kvpilot.fullname" -}}
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

{{/*
"<chart>-<version>" for the helm.sh/chart label ("+" is not allowed in label values).
*/}}
{{- define "kvpilot.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object the chart renders (the presets under files/ excepted: they are shipped
verbatim).
*/}}
{{- define "kvpilot.labels" -}}
helm.sh/chart: {{ include "kvpilot.chart" . }}
{{ include "kvpilot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvpilot
{{- end }}

{{/*
Selector labels: immutable in a Deployment, so they hold nothing that changes on upgrade.
*/}}
{{- define "kvpilot.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvpilot.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "kvpilot.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvpilot.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest pins it when set, else the tag,
else the chart's appVersion. Call with (dict "image" .Values.image "context" $).
*/}}
{{- define "kvpilot.image" -}}
{{- $img := .image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .context.Chart.AppVersion $img.tag | toString) }}
{{- end }}
{{- end }}

{{- define "kvpilot.operatorImage" -}}
{{- include "kvpilot.image" (dict "image" .Values.image "context" .) }}
{{- end }}

{{- define "kvpilot.engineImage" -}}
{{- include "kvpilot.image" (dict "image" .Values.engine.image "context" .) }}
{{- end }}

{{/*
What the operator does in a namespace whose LLMServices it serves: in the ClusterRole when it
watches every namespace, in a Role per namespace when operator.watchNamespaces is set.
*/}}
{{- define "kvpilot.namespacedRules" -}}
# LLMServices: reconciled (kopf's annotations), their status and replica count patched.
- apiGroups: ["kvpilot.io"]
  resources: ["llmservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvpilot.io"]
  resources: ["llmservices/status", "llmservices/scale"]
  verbs: ["get", "patch"]
# The objects an LLMService owns (server-side apply: create and patch), watched for drift.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each router's Role and RoleBinding (RBAC lets the operator grant no more than it holds: the
# router's pods and ConfigMap watches are among the grants here).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Engine pods: why they do not start (Degraded=EngineFailing).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Events on LLMServices, through both the core and the events.k8s.io APIs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
