{{/* The release-scoped base name of every object. */}}
{{- define "unhidra.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "unhidra.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "unhidra.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The services: values key, binary, component name, and whether the service is
reachable from outside the release (its API is public).
*/}}
{{- define "unhidra.services" -}}
gateway: {binary: gateway-service, component: gateway, public: true}
authApi: {binary: auth-api, component: auth-api, public: true}
chatService: {binary: chat-service, component: chat-service, public: true}
historyService: {binary: history-service, component: history-service, public: true}
auditService: {binary: audit-service, component: audit-service, public: false}
{{- end -}}

{{- define "unhidra.secretName" -}}
{{- if .Values.postgres.existingSecret -}}
{{- .Values.postgres.existingSecret -}}
{{- else -}}
{{- include "unhidra.fullname" . -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis URL: the operator's, or the chart's. */}}
{{- define "unhidra.redisSecretName" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- include "unhidra.fullname" . -}}
{{- end -}}
{{- end -}}
