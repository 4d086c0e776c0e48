{{- define "pao.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pao.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pao.labels" -}}
{{ include "pao.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pao.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pao.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pao.leaderElection" -}}
{{- if kindIs "bool" .Values.leaderElection.enabled -}}
{{- .Values.leaderElection.enabled -}}
{{- else -}}
{{- gt (int .Values.replicaCount) 1 -}}
{{- end -}}
{{- end -}}

{{/* Rules on what the operator manages, wherever it watches. */}}
{{- define "pao.managedRules" -}}
- apiGroups: [prefect.io]
  resources: [prefectagents, prefectworkpools, prefectdeployments]
  verbs: [get, list, watch, patch, update]
- apiGroups: [prefect.io]
  resources: [prefectagents/status, prefectworkpools/status, prefectdeployments/status]
  verbs: [get, patch, update]
- apiGroups: [prefect.io]
  resources: [prefectagents/finalizers, prefectworkpools/finalizers, prefectdeployments/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{- define "pao.secretRules" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Base job templates kept in ConfigMaps (PrefectWorkPool), where the Secrets are read;
# list/watch so that an edit is followed at once (without them: at every resync).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
{{- end -}}
