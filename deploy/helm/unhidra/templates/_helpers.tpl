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
The services: values key, binary, component name, whether clients reach it
directly (only the gateway) or through the gateway (`routed`, with the
variable that tells the gateway where it is), and whether it keeps a
database (all but the gateway).
*/}}
{{- define "unhidra.services" -}}
gateway: {binary: gateway-service, component: gateway, public: true, database: false}
authApi: {binary: auth-api, component: auth-api, routed: UNHIDRA_AUTH_API_URL, database: true}
chatService: {binary: chat-service, component: chat-service, routed: UNHIDRA_CHAT_URL, database: true}
historyService: {binary: history-service, component: history-service, routed: UNHIDRA_HISTORY_URL, database: true}
auditService: {binary: audit-service, component: audit-service, database: true}
{{- end -}}

{{/* The chart's own Secret. */}}
{{- define "unhidra.ownSecret" -}}
{{- include "unhidra.fullname" . -}}
{{- end -}}

{{/*
An env entry from a credential: `value` in the chart's Secret under
`existingSecretKey`, or that key of the operator's `existingSecret`.
Arguments: (list root name credential).
*/}}
{{- define "unhidra.secretEnv" -}}
{{- $root := index . 0 -}}
{{- $credential := index . 2 -}}
- name: {{ index . 1 }}
  valueFrom:
    secretKeyRef:
      name: {{ $credential.existingSecret | default (include "unhidra.ownSecret" $root) }}
      key: {{ $credential.existingSecretKey }}
{{- end -}}

{{/* Whether a credential is set at all (a value, or an existing Secret). */}}
{{- define "unhidra.isSet" -}}
{{- if or .value .url .existingSecret }}true{{ end -}}
{{- end -}}

{{/* The Secret of the services' NATS passwords: the operator's, or the chart's own. */}}
{{- define "unhidra.natsSecret" -}}
{{- .Values.nats.users.existingSecret | default (printf "%s-nats-users" (include "unhidra.fullname" .)) -}}
{{- end -}}

{{/* The variable holding a service's NATS password, as `unhidra nats-config` names it. Argument: the binary. */}}
{{- define "unhidra.natsPasswordVariable" -}}
{{- printf "%s_NATS_PASSWORD" (. | upper | replace "-" "_") -}}
{{- end -}}
