{{/*
Names, labels and the derived values every template shares: the Redis
endpoint and its password Secret, each pool's GPU placement, and the checks
that values.schema.json cannot express (they fail the render with the key).
*/}}

{{/* KubeRay appends group names and random suffixes to pod and Service names,
so the prefix is kept well under the 63-character label limit. */}}
{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "baton.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "baton.clusterName" -}}
{{- default (include "baton.fullname" .) .Values.baton.name -}}
{{- end -}}

{{/* ----- Redis: one endpoint for Baton's state and, optionally, Ray's GCS. */}}
{{- define "baton.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "baton.fullname" .) -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{- define "baton.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.externalRedis.port }}{{ end -}}
{{- end -}}

{{- define "baton.redis.tls" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls }}true{{ end -}}
{{- end -}}

{{- define "baton.redis.url" -}}
{{- $db := ternary 0 .Values.externalRedis.db .Values.redis.enabled -}}
{{- printf "%s://%s:%s/%d" (ternary "rediss" "redis" (eq (include "baton.redis.tls" .) "true")) (include "baton.redis.host" .) (include "baton.redis.port" .) (int $db) -}}
{{- end -}}

{{/* Name of the Secret with the Redis password; empty when Redis has none. */}}
{{- define "baton.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "baton.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "baton.redis.secretKey" -}}
{{- ternary .Values.redis.auth.existingSecretKey .Values.externalRedis.existingSecretKey .Values.redis.enabled -}}
{{- end -}}

{{- define "baton.auth.secretName" -}}
{{- default (printf "%s-api-token" (include "baton.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Environment variables the Secrets reach the pods through; Baton's config
names them (redis.password_env, server.auth_token_env) and never holds a value. */}}
{{- define "baton.redisPasswordEnv" -}}BATON_REDIS_PASSWORD{{- end -}}
{{- define "baton.authTokenEnv" -}}BATON_API_TOKEN{{- end -}}

{{/* A generated Secret value: the one already in the cluster (kept on upgrade)
or a random one on first install. */}}
{{- define "baton.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name -}}
{{- if and $existing (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{- define "baton.redisPasswordEnvVar" -}}
{{- if include "baton.redis.secretName" . }}
- name: {{ include "baton.redisPasswordEnv" . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "baton.redis.secretName" . }}
      key: {{ include "baton.redis.secretKey" . }}
{{- end }}
{{- end -}}

{{/* ----- Pools: GPU placement. Call with (dict "root" $ "pool" $pool). */}}
{{- define "baton.pool.workersPerPod" -}}
{{- $pool := .pool -}}
{{- if hasKey $pool "workersPerPod" }}{{ int $pool.workersPerPod }}{{ else }}{{ max 1 (int $pool.gpusPerPod) }}{{ end -}}
{{- end -}}

{{/* Count of the Ray resource gpu_type:<T> a pod offers; each Baton worker takes
one. With GPUs it is the pod's GPU count, as on a bare-metal node; without GPUs
(emulated type) it is the number of workers the pod hosts. */}}
{{- define "baton.pool.gpuTypeSlots" -}}
{{- if gt (int .pool.gpusPerPod) 0 }}{{ int .pool.gpusPerPod }}{{ else }}{{ include "baton.pool.workersPerPod" . }}{{ end -}}
{{- end -}}

{{/* rayStartParams.resources in the form KubeRay expects: a JSON object in a
double-quoted string, because it is pasted into a bash `ray start` line. */}}
{{- define "baton.pool.rayResources" -}}
{{- $json := dict (printf "gpu_type:%s" .pool.gpuType) (int (include "baton.pool.gpuTypeSlots" .)) | toJson -}}
{{- printf "\"%s\"" (replace "\"" "\\\"" $json) -}}
{{- end -}}

{{- define "baton.pool.gpuProducts" -}}
{{- $products := index .root.Values.gpuProducts .pool.gpuType | default list -}}
{{- toJson $products -}}
{{- end -}}

{{/* The pool's affinity with the GPU product constraint ANDed into every
required node selector term (or as the only term). */}}
{{- define "baton.pool.affinity" -}}
{{- $affinity := deepCopy (.pool.affinity | default dict) -}}
{{- if gt (int .pool.gpusPerPod) 0 -}}
{{- $gpu := dict "key" .root.Values.gpuProductLabel "operator" "In" "values" (include "baton.pool.gpuProducts" . | fromJsonArray) -}}
{{- $node := $affinity.nodeAffinity | default dict -}}
{{- $required := $node.requiredDuringSchedulingIgnoredDuringExecution | default dict -}}
{{- $terms := list -}}
{{- range ($required.nodeSelectorTerms | default (list dict)) -}}
{{- $terms = append $terms (set (deepCopy .) "matchExpressions" (append (.matchExpressions | default list) $gpu)) -}}
{{- end -}}
{{- $_ := set $required "nodeSelectorTerms" $terms -}}
{{- $_ := set $node "requiredDuringSchedulingIgnoredDuringExecution" $required -}}
{{- $_ := set $affinity "nodeAffinity" $node -}}
{{- end -}}
{{- toYaml $affinity -}}
{{- end -}}

{{- define "baton.pool.labels" -}}
app.kubernetes.io/component: worker
baton/pool: {{ .pool.name }}
baton/role: {{ .pool.role }}
baton/gpu-type: {{ .pool.gpuType }}
{{- end -}}

{{/* ----- Checks across keys; each failure names the key. */}}
{{- define "baton.validate" -}}
{{- $roles := list -}}
{{- $names := list -}}
{{- range $i, $pool := .Values.pools -}}
{{- $key := printf "pools[%d]" $i -}}
{{- if has $pool.name $names -}}
{{- fail (printf "%s.name: %q is used by another pool; pool names must be unique" $key $pool.name) -}}
{{- end -}}
{{- $names = append $names $pool.name -}}
{{- $roles = append $roles $pool.role -}}
{{- if not (and (le (int $pool.minReplicas) (int $pool.replicas)) (le (int $pool.replicas) (int $pool.maxReplicas))) -}}
{{- fail (printf "%s: need minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $key (int $pool.minReplicas) (int $pool.replicas) (int $pool.maxReplicas)) -}}
{{- end -}}
{{- if ($pool.autoscale | default dict).enabled -}}
{{- if eq $pool.role "prefill" -}}
{{- fail (printf "%s.autoscale.enabled: pool role %q cannot be autoscaled by Baton; allowed roles: decode, mixed" $key $pool.role) -}}
{{- end -}}
{{- if not $.Values.autoscaling.enabled -}}
{{- fail (printf "%s.autoscale.enabled needs autoscaling.enabled: the Ray autoscaler adds the pods Baton's new replicas wait for" $key) -}}
{{- end -}}
{{- end -}}
{{- if ($pool.engine | default dict).cpu_kernels -}}
{{- if gt (int $pool.gpusPerPod) 0 -}}
{{- fail (printf "%s.engine.cpu_kernels: true needs a CPU pool (gpusPerPod: 0), got gpusPerPod: %d" $key (int $pool.gpusPerPod)) -}}
{{- end -}}
{{- if ne $.Values.model.dtype "float32" -}}
{{- fail (printf "%s.engine.cpu_kernels: true needs model.dtype float32, got %q" $key $.Values.model.dtype) -}}
{{- end -}}
{{- end -}}
{{- $ctx := dict "root" $ "pool" $pool -}}
{{- $workers := int (include "baton.pool.workersPerPod" $ctx) -}}
{{- if gt (int $pool.gpusPerPod) 0 -}}
{{- if eq (include "baton.pool.gpuProducts" $ctx) "[]" -}}
{{- fail (printf "%s.gpuType: %q has no entry in gpuProducts; add gpuProducts.%s: [<%s node label values>]" $key $pool.gpuType $pool.gpuType $.Values.gpuProductLabel) -}}
{{- end -}}
{{- if ne 0 (mod (int $pool.gpusPerPod) $workers) -}}
{{- fail (printf "%s.workersPerPod: %d does not divide gpusPerPod %d" $key $workers (int $pool.gpusPerPod)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if has "mixed" $roles -}}
{{- if or (has "prefill" $roles) (has "decode" $roles) -}}
{{- fail "pools: a mixed pool cannot be combined with prefill/decode pools" -}}
{{- end -}}
{{- else if not (and (has "prefill" $roles) (has "decode" $roles)) -}}
{{- fail (printf "pools: a disaggregated cluster needs both a prefill and a decode pool, got roles %v" $roles) -}}
{{- end -}}
{{- $weights := .Values.model.weights -}}
{{- if eq $weights.volume "none" -}}
{{- if hasPrefix "/" .Values.model.source -}}
{{- fail (printf "model.source: %q is a directory but model.weights.volume is none; mount the weights (pvc, hostPath or initContainer)" .Values.model.source) -}}
{{- end -}}
{{- else if not (hasPrefix (printf "%s/" (trimSuffix "/" $weights.mountPath)) .Values.model.source) -}}
{{- fail (printf "model.source: %q must be a directory under model.weights.mountPath %q" .Values.model.source $weights.mountPath) -}}
{{- end -}}
{{- end -}}
