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

{{/* The chart's own Secret of broker URLs (and the bundled broker's passwords). */}}
{{- define "proxymq.brokerSecretName" -}}
{{- printf "%s-broker" (include "proxymq.fullname" .) -}}
{{- end -}}

{{- define "proxymq.jobsSecretName" -}}
{{- printf "%s-jobs" (include "proxymq.fullname" .) -}}
{{- end -}}

{{/* Broker roles, each with its own broker user. */}}
{{- define "proxymq.brokerRoles" -}}
gateway workers monitoring
{{- end -}}

{{/* Secret name and key of one role's broker URL (input: dict root, role). Output: YAML. */}}
{{- define "proxymq.brokerRef" -}}
{{- $b := index .root.Values.broker .role -}}
{{- if $b.existingSecret -}}
name: {{ $b.existingSecret }}
key: {{ $b.existingSecretKey | default "url" }}
{{- else -}}
name: {{ include "proxymq.brokerSecretName" .root }}
key: {{ printf "%s-url" .role }}
{{- end -}}
{{- end -}}

{{/* Whether the chart's broker Secret is needed: some role's URL is the chart's to hold. */}}
{{- define "proxymq.chartBrokerSecret" -}}
{{- $root := . -}}
{{- range (include "proxymq.brokerRoles" . | splitList " ") -}}
{{- $b := index $root.Values.broker . -}}
{{- if and (not $root.Values.broker.operator.enabled) (not $b.existingSecret) (or $b.url $root.Values.broker.bundled.enabled) }}yes{{ end -}}
{{- end -}}
{{- end -}}

{{/* Whether any worker is scaled by KEDA. */}}
{{- define "proxymq.anyKeda" -}}
{{- $root := . -}}
{{- range .Values.workers -}}
{{- $w := include "proxymq.workerSettings" (dict "root" $root "worker" .) | fromYaml -}}
{{- if $w.keda.enabled }}yes{{ end -}}
{{- end -}}
{{- end -}}

{{/* A secret value as an env entry (input: dict root, name, setting, default). */}}
{{- define "proxymq.secretEnv" -}}
{{- $s := .setting -}}
{{- if or $s.existingSecret $s.value }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      {{- if $s.existingSecret }}
      name: {{ $s.existingSecret }}
      key: {{ $s.existingSecretKey | default .name }}
      {{- else }}
      name: {{ include "proxymq.jobsSecretName" .root }}
      key: {{ .name }}
      {{- end }}
{{- end }}
{{- end -}}

{{- define "proxymq.rabbitmqName" -}}
{{- printf "%s-rabbitmq" (include "proxymq.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "proxymq.queueType" -}}
{{- if .Values.broker.operator.enabled -}}
quorum
{{- else if .Values.broker.bundled.enabled -}}
{{- .Values.broker.bundled.queueType | default "classic" -}}
{{- else -}}
{{- .Values.broker.external.queueType | default "quorum" -}}
{{- end -}}
{{- end -}}

{{/* Checks run once per render. */}}
{{- define "proxymq.validate" -}}
{{- $root := . -}}
{{- $keda := include "proxymq.anyKeda" . -}}
{{- $op := .Values.broker.operator -}}
{{- if $op.enabled -}}
{{- if .Values.broker.bundled.enabled -}}
{{- fail "broker.operator.enabled: set broker.bundled.enabled=false (the operators' cluster replaces the bundled broker)" -}}
{{- end -}}
{{- if eq .Values.broker.external.queueType "classic" -}}
{{- fail "broker.operator.enabled: a replicated cluster needs quorum queues; broker.external.queueType must not be classic" -}}
{{- end -}}
{{- if not (has $op.connectVia (list "service" "nodes")) -}}
{{- fail "broker.operator.connectVia must be service or nodes" -}}
{{- end -}}
{{- if and (eq $op.connectVia "nodes") (include "proxymq.operator.tls" .) -}}
{{- fail "broker.operator.connectVia=nodes with TLS: each node of the list is checked against its own host name, and the cluster's certificate (cluster.tls.secretName) is to name the Service; use connectVia=service" -}}
{{- end -}}
{{- if and (include "proxymq.operator.tls" .) (not .Values.broker.tls.existingSecret) -}}
{{- fail "broker.operator.cluster.tls.secretName: set broker.tls.existingSecret to a Secret with the CA (ca.crt) the gateway and workers trust" -}}
{{- end -}}
{{- range (include "proxymq.brokerRoles" . | splitList " ") -}}
{{- $b := index $root.Values.broker . -}}
{{- if or $b.url $b.existingSecret -}}
{{- fail (printf "broker.%s: with broker.operator.enabled the credentials come from the topology operator's User; leave broker.%s.url/existingSecret empty" . .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range (include "proxymq.brokerRoles" . | splitList " ") -}}
{{- $b := index $root.Values.broker . -}}
{{- if and $root.Values.broker.bundled.enabled (or $b.url $b.existingSecret) -}}
{{- fail (printf "broker.%s: the bundled broker makes its own users; set broker.%s.url/existingSecret only with broker.bundled.enabled=false" . .) -}}
{{- end -}}
{{- if not (or $root.Values.broker.bundled.enabled $root.Values.broker.operator.enabled $b.url $b.existingSecret (and (eq . "monitoring") (not $keda))) -}}
{{- fail (printf "broker: set broker.%s.url or broker.%s.existingSecret (each role has its own broker user), or enable broker.bundled" . .) -}}
{{- end -}}
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

{{/* Environment shared by gateway and workers (input: dict root, role). */}}
{{- define "proxymq.commonEnv" -}}
{{- $root := .root -}}
{{- if $root.Values.broker.operator.enabled }}
{{- $secret := include "proxymq.operator.credentialsSecret" (dict "root" $root "role" .role) }}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: username
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: password
- name: PROXYMQ_BROKER_URL
  value: {{ include "proxymq.operator.brokerUrl" $root | quote }}
{{- else }}
- name: PROXYMQ_BROKER_URL
  valueFrom:
    secretKeyRef:
      {{- include "proxymq.brokerRef" (dict "root" $root "role" .role) | nindent 6 }}
{{- end }}
- name: PROXYMQ_CONFIG
  value: /etc/proxymq/proxymq.toml
- name: PROXYMQ_QUEUE_TYPE
  value: {{ include "proxymq.queueType" $root | quote }}
{{- with $root.Values.broker.tls.existingSecret }}
{{- $dir := $root.Values.broker.tls.mountPath | trimSuffix "/" }}
- name: PROXYMQ_BROKER_CA_FILE
  value: {{ printf "%s/ca.crt" $dir | quote }}
{{- if $root.Values.broker.tls.clientCertificate }}
- name: PROXYMQ_BROKER_CERT_FILE
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: PROXYMQ_BROKER_KEY_FILE
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- end }}
{{- include "proxymq.secretEnv" (dict "root" $root "name" "PROXYMQ_RESULT_URL" "setting" $root.Values.jobs.resultUrl) }}
{{- if eq .role "workers" }}
{{- include "proxymq.secretEnv" (dict "root" $root "name" "PROXYMQ_CALLBACK_SECRET" "setting" $root.Values.jobs.callbackSecret) }}
{{- end }}
{{- range $k, $v := $root.Values.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes every ProxyMQ pod mounts: the TOML config and a writable /tmp. */}}
{{- define "proxymq.volumes" -}}
- name: config
  configMap:
    name: {{ include "proxymq.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- with .Values.broker.tls.existingSecret }}
- name: broker-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      {{- if $.Values.broker.tls.clientCertificate }}
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- end }}
{{- end }}
{{- end -}}

{{- define "proxymq.volumeMounts" -}}
- name: config
  mountPath: /etc/proxymq
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.broker.tls.existingSecret }}
- name: broker-tls
  mountPath: {{ .Values.broker.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* ---- RabbitMQ on the operators (broker.operator) ---------------------------------- */}}

{{/* Permissions of each broker role: the same tags and regexes as files/rabbitmq-start.sh
(tests/deploy/test_rabbitmq_operators.py compares them). Output: YAML. */}}
{{- define "proxymq.brokerPermissions" -}}
gateway:
  tags: []
  configure: '^(amq\.gen-.*|proxymq\.status)$'
  write: '^(amq\.default|amq\.gen-.*)$'
  read: '^(amq\.gen-.*|proxymq\.status)$'
workers:
  tags: []
  configure: '^(.*_requests|.*_requests\.dead|.*_callbacks|.*_callbacks\.retry\.[0-9]+|proxymq\.cancel\..*|proxymq\.status|celery|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$'
  write: '^(amq\.default|.*_requests|proxymq\.status|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$'
  read: '^(.*_requests|.*_callbacks|.*_callbacks\.retry\.[0-9]+|proxymq\.cancel\..*|celery|celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.celery\.pidbox)$'
monitoring:
  tags: [monitoring]
  configure: '^$'
  write: '^$'
  read: '^$'
observer:
  tags: []
  configure: '^(celeryev|celeryev\..*|celery\.pidbox|reply\.celery\.pidbox|.*\.reply\.celery\.pidbox)$'
  write: '^(celery\.pidbox|celeryev\..*|.*\.reply\.celery\.pidbox)$'
  read: '^(celeryev|celeryev\..*|reply\.celery\.pidbox|.*\.reply\.celery\.pidbox)$'
{{- end -}}

{{/* Roles that get a topology-operator User: gateway, workers, monitoring, and observer if enabled. */}}
{{- define "proxymq.operator.roles" -}}
gateway workers monitoring{{ if .Values.broker.operator.users.observer.enabled }} observer{{ end }}
{{- end -}}

{{- define "proxymq.operator.clusterName" -}}
{{- .Values.broker.operator.cluster.name | default (include "proxymq.rabbitmqName" .) -}}
{{- end -}}

{{- define "proxymq.operator.clusterNamespace" -}}
{{- .Values.broker.operator.cluster.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* rabbitmqClusterReference of the topology objects. */}}
{{- define "proxymq.operator.clusterRef" -}}
name: {{ include "proxymq.operator.clusterName" . }}
{{- if ne (include "proxymq.operator.clusterNamespace" .) .Release.Namespace }}
namespace: {{ include "proxymq.operator.clusterNamespace" . }}
{{- end }}
{{- end -}}

{{/* Name of a role's User object (input: dict root, role). */}}
{{- define "proxymq.operator.userName" -}}
{{- printf "%s-broker-%s" (include "proxymq.fullname" .root) .role -}}
{{- end -}}

{{/* The Secret the topology operator writes for a role's User: <user>-user-credentials,
keys username and password (also when the credentials were imported). */}}
{{- define "proxymq.operator.credentialsSecret" -}}
{{- printf "%s-user-credentials" (include "proxymq.operator.userName" .) -}}
{{- end -}}

{{- define "proxymq.operator.tls" -}}
{{- if .Values.broker.operator.cluster.tls.secretName }}yes{{ end -}}
{{- end -}}

{{- define "proxymq.operator.port" -}}
{{- if include "proxymq.operator.tls" . }}5671{{ else }}5672{{ end -}}
{{- end -}}

{{/* The URL path of the vhost: "/" is %2F. */}}
{{- define "proxymq.operator.vhostPath" -}}
{{- $v := .Values.broker.operator.vhost | default "/" -}}
{{- if eq $v "/" }}%2F{{ else }}{{ $v | urlquery }}{{ end -}}
{{- end -}}

{{/* Broker hosts: the cluster's Service, or every node (connectVia: nodes). */}}
{{- define "proxymq.operator.hosts" -}}
{{- $name := include "proxymq.operator.clusterName" . -}}
{{- $ns := include "proxymq.operator.clusterNamespace" . -}}
{{- if eq .Values.broker.operator.connectVia "nodes" -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.broker.operator.cluster.replicas) -}}
{{- $hosts = append $hosts (printf "%s-server-%d.%s-nodes.%s.svc" $name $i $name $ns) -}}
{{- end -}}
{{- join " " $hosts -}}
{{- else -}}
{{- printf "%s.%s.svc" $name $ns -}}
{{- end -}}
{{- end -}}

{{/* PROXYMQ_BROKER_URL with the operator: credentials by reference to the environment
variables RABBITMQ_USERNAME and RABBITMQ_PASSWORD (Kubernetes expands $(VAR) of entries
defined before it), so no secret is in the pod spec. One URL per host, ';'-separated. */}}
{{- define "proxymq.operator.brokerUrl" -}}
{{- $root := . -}}
{{- $scheme := ternary "amqps" "amqp" (ne (include "proxymq.operator.tls" .) "") -}}
{{- $urls := list -}}
{{- range (include "proxymq.operator.hosts" . | splitList " ") -}}
{{- $urls = append $urls (printf "%s://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:%s/%s" $scheme . (include "proxymq.operator.port" $root) (include "proxymq.operator.vhostPath" $root)) -}}
{{- end -}}
{{- join ";" $urls -}}
{{- end -}}
