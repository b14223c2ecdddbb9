{{/* Chart name. */}}
{{- define "proxymq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name. */}}
{{- define "proxymq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "proxymq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "proxymq.labels" -}}
helm.sh/chart: {{ include "proxymq.chart" . }}
{{ include "proxymq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "proxymq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "proxymq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "proxymq.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "proxymq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "proxymq.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Name of the Secret that holds PROXYMQ_BROKER_URL. */}}
{{- define "proxymq.brokerSecretName" -}}
{{- if .Values.broker.existingSecret -}}
{{- .Values.broker.existingSecret -}}
{{- else -}}
{{- printf "%s-broker" (include "proxymq.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "proxymq.brokerSecretKey" -}}
{{- if .Values.broker.existingSecret -}}
{{- .Values.broker.existingSecretKey | default "PROXYMQ_BROKER_URL" -}}
{{- else -}}
PROXYMQ_BROKER_URL
{{- end -}}
{{- end -}}

{{- define "proxymq.rabbitmqName" -}}
{{- printf "%s-rabbitmq" (include "proxymq.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "proxymq.queueType" -}}
{{- if .Values.broker.bundled.enabled -}}
{{- .Values.broker.bundled.queueType | default "classic" -}}
{{- else -}}
{{- .Values.broker.external.queueType | default "quorum" -}}
{{- end -}}
{{- end -}}

{{/* Checks run once per render. */}}
{{- define "proxymq.validate" -}}
{{- if and .Values.broker.bundled.enabled .Values.broker.external.url -}}
{{- fail "broker: set either broker.external.url or broker.bundled.enabled, not both" -}}
{{- end -}}
{{- if not (or .Values.broker.bundled.enabled .Values.broker.external.url .Values.broker.existingSecret) -}}
{{- fail "broker: set broker.external.url (or broker.existingSecret), or enable broker.bundled" -}}
{{- end -}}
{{- if not (has (include "proxymq.queueType" .) (list "classic" "quorum")) -}}
{{- fail "broker queueType must be classic or quorum" -}}
{{- end -}}
{{- $seen := dict -}}
{{- range .Values.workers -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]{1,64}$" (toString .name)) -}}
{{- fail (printf "workers: service name %q must match [A-Za-z0-9_-]{1,64}" (toString .name)) -}}
{{- end -}}
{{- if has .name (list "healthz" "readyz" "metrics" "jobs") -}}
{{- fail (printf "workers: %q is a reserved name" .name) -}}
{{- end -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "workers: service %q is listed twice" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- end -}}
{{- end -}}

{{/* Kubernetes-safe name part for a service (underscores are not allowed). */}}
{{- define "proxymq.serviceSlug" -}}
{{- . | lower | replace "_" "-" | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Effective settings of one worker: workerDefaults merged with the entry. Input: dict root, worker. Output: YAML. */}}
{{- define "proxymq.workerSettings" -}}
{{- $w := deepCopy .worker -}}
{{- $d := deepCopy .root.Values.workerDefaults -}}
{{- toYaml (mergeOverwrite $d $w) -}}
{{- end -}}

{{/* Downstream URL of one worker (input: dict root, worker). */}}
{{- define "proxymq.downstreamUrl" -}}
{{- $w := .worker -}}
{{- if $w.downstreamUrl -}}
{{- $w.downstreamUrl -}}
{{- else if and $w.sidecar $w.sidecar.enabled -}}
{{- printf "http://127.0.0.1:%v" ($w.sidecar.port | default 8080) -}}
{{- else if .root.Values.fetcher.enabled -}}
{{- printf "http://%s-fetcher:%v" (include "proxymq.fullname" .root) .root.Values.fetcher.service.port -}}
{{- else -}}
{{- fail (printf "workers: service %q needs downstreamUrl (the bundled fetcher is disabled)" $w.name) -}}
{{- end -}}
{{- end -}}

{{/* A TOML value: strings quoted, numbers and booleans as they are. */}}
{{- define "proxymq.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- . | quote -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- . -}}
{{- else -}}
{{- fail (printf "config values must be strings, numbers or booleans, not %s" (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by gateway and workers. */}}
{{- define "proxymq.commonEnv" -}}
- name: PROXYMQ_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "proxymq.brokerSecretName" . }}
      key: {{ include "proxymq.brokerSecretKey" . }}
- name: PROXYMQ_CONFIG
  value: /etc/proxymq/proxymq.toml
- name: PROXYMQ_QUEUE_TYPE
  value: {{ include "proxymq.queueType" . | quote }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{/* Volumes every ProxyMQ pod mounts: the TOML config and a writable /tmp. */}}
{{- define "proxymq.volumes" -}}
- name: config
  configMap:
    name: {{ include "proxymq.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "proxymq.volumeMounts" -}}
- name: config
  mountPath: /etc/proxymq
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}
