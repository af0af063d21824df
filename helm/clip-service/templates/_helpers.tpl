{{/*
Chart name, overridable; truncated because some Kubernetes name fields are DNS labels
(63 characters).
*/}}
{{- define "clip-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or just <release> when the release name already contains
the chart name. Truncated to 63 characters (DNS label limit).
*/}}
{{- define "clip-service.fullname" -}}
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
Name of one component's resources: <fullname>-<component>. The full name is cut first so
the suffix always survives; cutting after joining could give two components one name.
Usage: include "clip-service.componentName" (list $ "triton")
*/}}
{{- define "clip-service.componentName" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $room := sub 62 (len $component) | int }}
{{- printf "%s-%s" (include "clip-service.fullname" $root | trunc $room | trimSuffix "-") $component }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "clip-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component: immutable once a Deployment exists, so nothing
version-dependent goes here.
Usage: include "clip-service.selectorLabels" (list $ "gateway")
*/}}
{{- define "clip-service.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "clip-service.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
Common labels of one component.
Usage: include "clip-service.labels" (list $ "gateway")
*/}}
{{- define "clip-service.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "clip-service.chart" $root }}
{{ include "clip-service.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: {{ include "clip-service.name" $root }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "clip-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clip-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference from {repository, tag, digest}; the tag defaults to appVersion and a
digest wins over the tag so deployments can be pinned immutably.
Usage: include "clip-service.image" (list $ .Values.gateway.image)
*/}}
{{- define "clip-service.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
Triton gRPC address the gateway calls.
*/}}
{{- define "clip-service.tritonUrl" -}}
{{- if .Values.gateway.tritonUrl }}
{{- .Values.gateway.tritonUrl }}
{{- else if .Values.triton.service.headless }}
{{- /* One address per ready Triton pod: the gateway sends each call to the next one
     (round robin). Pod addresses take the container's gRPC port (triton/deployment.yaml). */}}
{{- printf "dns:///%s:8001" (include "clip-service.componentName" (list . "triton-headless")) }}
{{- else }}
{{- printf "%s:%d" (include "clip-service.componentName" (list . "triton")) (int .Values.triton.service.grpcPort) }}
{{- end }}
{{- end }}

{{/*
Redis host:port of the builtin Redis.
*/}}
{{- define "clip-service.redisAddress" -}}
{{- printf "%s:%d" (include "clip-service.componentName" (list . "redis")) (int .Values.redis.builtin.port) }}
{{- end }}

{{/*
Secret and key holding the builtin Redis password.
*/}}
{{- define "clip-service.redisPasswordSecret" -}}
{{- default (include "clip-service.componentName" (list . "redis")) .Values.redis.builtin.auth.existingSecret }}
{{- end }}

{{- define "clip-service.redisPasswordKey" -}}
{{- if .Values.redis.builtin.auth.existingSecret }}
{{- .Values.redis.builtin.auth.existingSecretKey }}
{{- else }}
{{- "redis-password" }}
{{- end }}
{{- end }}

{{/*
Secret and key holding the API keys file.
*/}}
{{- define "clip-service.apiKeysSecret" -}}
{{- default (include "clip-service.componentName" (list . "api-keys")) .Values.gateway.apiKeys.existingSecret }}
{{- end }}

{{- define "clip-service.apiKeysKey" -}}
{{- if .Values.gateway.apiKeys.existingSecret }}
{{- .Values.gateway.apiKeys.existingSecretKey }}
{{- else }}
{{- "api-keys" }}
{{- end }}
{{- end }}

{{/*
Where the gateway mounts secrets and TLS material.
*/}}
{{- define "clip-service.apiKeysDir" -}}/etc/clip/api-keys{{- end }}
{{- define "clip-service.tlsDir" -}}/etc/clip/tls{{- end }}
{{- define "clip-service.clientCaDir" -}}/etc/clip/client-ca{{- end }}

{{/*
Directory tritonserver serves. When the configs are rewritten (CPU mode, or an instance
count per GPU) an init container writes a copy there whose config.pbtxt files say so.
*/}}
{{- define "clip-service.tritonServedRepository" -}}
{{- if include "clip-service.tritonRewritesConfigs" . }}
{{- "/served-model-repository" }}
{{- else }}
{{- .Values.triton.modelRepository.path }}
{{- end }}
{{- end }}

{{/*
Cross-field checks a JSON schema cannot express; they fail `helm template` with a message.
*/}}
{{- define "clip-service.validate" -}}
{{- $g := .Values.gateway }}
{{- if le (int $g.terminationGracePeriodSeconds) (add (int $g.shutdownGraceSeconds) (int $g.preStopSleepSeconds) | int) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must exceed gateway.shutdownGraceSeconds + gateway.preStopSleepSeconds (%d + %d), or in-flight calls are killed" (int $g.terminationGracePeriodSeconds) (int $g.shutdownGraceSeconds) (int $g.preStopSleepSeconds)) }}
{{- end }}
{{- $ports := $g.containerPorts }}
{{- if ne (len (uniq (list (int $ports.grpc) (int $ports.metrics) (int $ports.health)))) 3 }}
{{- fail (printf "gateway.containerPorts grpc (%d), metrics (%d) and health (%d) must be three different ports" (int $ports.grpc) (int $ports.metrics) (int $ports.health)) }}
{{- end }}
{{- if and .Values.triton.enabled (le (int .Values.triton.terminationGracePeriodSeconds) (int .Values.triton.exitTimeoutSeconds)) }}
{{- fail "triton.terminationGracePeriodSeconds must exceed triton.exitTimeoutSeconds" }}
{{- end }}
{{- if and (eq $g.backend "triton") (not .Values.triton.enabled) (not $g.tritonUrl) }}
{{- fail "gateway.backend=triton needs triton.enabled=true or gateway.tritonUrl" }}
{{- end }}
{{- if and .Values.triton.enabled (eq .Values.triton.modelRepository.source "pvc") (not .Values.triton.modelRepository.pvc.existingClaim) }}
{{- fail "triton.modelRepository.source=pvc needs triton.modelRepository.pvc.existingClaim" }}
{{- end }}
{{- if and $g.apiKeys.enabled (not $g.apiKeys.existingSecret) (not $g.apiKeys.keys) }}
{{- fail "gateway.apiKeys.enabled needs gateway.apiKeys.existingSecret or gateway.apiKeys.keys" }}
{{- end }}
{{- if and $g.tls.enabled (not $g.tls.existingSecret) }}
{{- fail "gateway.tls.enabled needs gateway.tls.existingSecret (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.mode=external needs redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- if and $g.autoscaling.enabled (gt (int $g.autoscaling.minReplicas) (int $g.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- $ta := .Values.triton.autoscaling }}
{{- if and $ta.enabled (not .Values.triton.enabled) }}
{{- fail "triton.autoscaling.enabled needs triton.enabled=true" }}
{{- end }}
{{- if and $ta.enabled (gt (int $ta.minReplicas) (int $ta.maxReplicas)) }}
{{- fail "triton.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}

{{/*
The gateway resource its decode threads follow: limits.cpu when the container has a CPU
limit, else requests.cpu when it has a request, else "" (the gateway then counts the CPUs
it may use). Empty too when gateway.decodeThreads sets a number.
*/}}
{{- define "clip-service.decodeThreadsResource" -}}
{{- $g := .Values.gateway }}
{{- if eq (int $g.decodeThreads) 0 }}
{{- $resources := $g.resources | default dict }}
{{- if ($resources.limits | default dict).cpu }}
{{- "limits.cpu" }}
{{- else if ($resources.requests | default dict).cpu }}
{{- "requests.cpu" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Names of the Pods metrics the autoscalers read through the custom metrics API; the
prometheus-adapter rules (templates/adapter-rules.yaml) serve them under these names.
*/}}
{{- define "clip-service.gatewayQueueMetric" -}}clip_queued_items{{- end }}
{{- define "clip-service.tritonQueueMetric" -}}clip_triton_queue_us_per_request{{- end }}

{{/*
Triton replicas the chart plans for: autoscaling.minReplicas when autoscaling, else
replicaCount. A PodDisruptionBudget only makes sense from two.
*/}}
{{- define "clip-service.tritonMinReplicas" -}}
{{- if .Values.triton.autoscaling.enabled }}{{ .Values.triton.autoscaling.minReplicas }}{{ else }}{{ .Values.triton.replicaCount }}{{ end }}
{{- end }}

{{/*
Whether Triton's config.pbtxt files are rewritten at start (init container
`model-config`): on CPU-only nodes (KIND_GPU → KIND_CPU) and when
triton.gpu.instancesPerGpu overrides the exported instance count.
*/}}
{{- define "clip-service.tritonRewritesConfigs" -}}
{{- if or (not .Values.triton.gpu.enabled) (gt (int .Values.triton.gpu.instancesPerGpu) 0) }}true{{ end }}
{{- end }}
