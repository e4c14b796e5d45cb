{{/*
Pieces shared by the head and worker pod templates of the RayCluster:
volumes (shared memory, model weights), their mounts, the weights init
container and the environment every Ray container gets.
*/}}

{{- define "baton.pod.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.sharedMemorySize }}
{{- $w := .Values.model.weights }}
{{- if eq $w.volume "pvc" }}
- name: model-weights
  persistentVolumeClaim:
    claimName: {{ $w.pvc.claimName }}
    readOnly: {{ $w.pvc.readOnly }}
{{- else if eq $w.volume "hostPath" }}
- name: model-weights
  hostPath:
    path: {{ $w.hostPath.path }}
    type: {{ $w.hostPath.type }}
{{- else if eq $w.volume "initContainer" }}
- name: model-weights
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "baton.pod.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- $w := .Values.model.weights }}
{{- if ne $w.volume "none" }}
- name: model-weights
  mountPath: {{ $w.mountPath }}
  readOnly: {{ or (ne $w.volume "pvc") $w.pvc.readOnly }}
{{- end }}
{{- end -}}

{{- define "baton.pod.initContainers" -}}
{{- $w := .Values.model.weights }}
{{- if eq $w.volume "initContainer" }}
initContainers:
  - name: fetch-model
    image: {{ $w.initContainer.image }}
    {{- with $w.initContainer.command }}
    command:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $w.initContainer.env }}
    env:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $w.initContainer.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: model-weights
        mountPath: {{ $w.mountPath }}
{{- end }}
{{- end -}}

{{- define "baton.pod.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- include "baton.redisPasswordEnvVar" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "baton.pod.common" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "baton.pod.initContainers" . }}
{{- end -}}
