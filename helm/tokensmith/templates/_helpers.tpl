{{/*
Naming and labels.
*/}}
{{- define "tokensmith.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokensmith.fullname" -}}
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

{{- define "tokensmith.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokensmith.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokensmith.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokensmith.labels" -}}
helm.sh/chart: {{ include "tokensmith.chart" . }}
{{ include "tokensmith.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end }}

{{- define "tokensmith.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokensmith.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tokensmith.configMapName" -}}
{{- if .Values.existingConfigMap }}
{{- .Values.existingConfigMap }}
{{- else }}
{{- printf "%s-config" (include "tokensmith.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
"true" when there is something to run: clients in `config`, or an existing
ConfigMap. The default values have neither, so they lint and render nothing.
*/}}
{{- define "tokensmith.configured" -}}
{{- if or .Values.config.clients .Values.existingConfigMap }}true{{ end }}
{{- end }}

{{- define "tokensmith.image" -}}
{{- $repository := .Values.image.repository }}
{{- with .Values.image.registry }}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Label the sidecar template puts on application pods; the sidecar-mode
PodMonitor selects it.
*/}}
{{- define "tokensmith.sidecarPodLabels" -}}
tokensmith/sidecar: {{ include "tokensmith.fullname" . }}
{{- end }}

{{/*
Whether the pod mounts the service account token: explicit value, else only
when Vault Kubernetes auth reads it (least privilege otherwise).
*/}}
{{- define "tokensmith.automountToken" -}}
{{- if kindIs "bool" .Values.serviceAccount.automountToken }}
{{- .Values.serviceAccount.automountToken }}
{{- else }}
{{- .Values.vault.kubernetesAuth.enabled }}
{{- end }}
{{- end }}

{{/*
The tokensmith config file. Values' `config` plus what the chart owns:
directories on the pod's emptyDirs, the health server on all interfaces (the
kubelet probes the pod IP) and, optionally, Vault Kubernetes auth.
*/}}
{{- define "tokensmith.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- /* A subdirectory, not the mount point: an emptyDir's root is owned by
root with mode 0777, which the daemon (non-root) can neither use as its
0700 state dir nor chmod; it creates state/ itself, 0700. */}}
{{- $_ := set $cfg "state_dir" "/var/lib/tokensmith/state" }}
{{- $_ := set $cfg "runtime_dir" "/run/tokensmith" }}
{{- $_ := set $cfg "health" (dict "enabled" true "listen" (printf "0.0.0.0:%d" (int .Values.healthPort))) }}
{{- if .Values.vault.kubernetesAuth.enabled }}
{{- $auth := dict "method" "kubernetes" "role" .Values.vault.kubernetesAuth.role "jwt_file" "/var/run/secrets/kubernetes.io/serviceaccount/token" }}
{{- with .Values.vault.kubernetesAuth.mountPoint }}
{{- $_ := set $auth "mount_point" . }}
{{- end }}
{{- $_ := set $cfg.vault "auth" $auth }}
{{- else if and $cfg.vault (not $cfg.vault.auth) }}
{{- fail "config.vault needs auth: enable vault.kubernetesAuth, or set config.vault.auth.method and pass the secret via secretEnv (e.g. TOKENSMITH_VAULT__AUTH__TOKEN)" }}
{{- end }}
{{- if eq .Values.mode "sidecar" }}
{{- $tokenDir := trimSuffix "/" .Values.sidecar.tokenDir }}
{{- $found := false }}
{{- range $cfg.clients }}
{{- range .sinks }}
{{- if and (eq .type "file") (hasPrefix (printf "%s/" $tokenDir) .path) }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "sidecar mode: no client has a file sink under sidecar.tokenDir (%s), so the application would never see a token" $tokenDir) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{- define "tokensmith.configChecksum" -}}
{{- if .Values.existingConfigMap }}
{{- .Values.existingConfigMap | sha256sum }}
{{- else }}
{{- include "tokensmith.config" . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Pod annotations: config checksum (roll pods on config change) and,
optionally, Prometheus scrape annotations.
*/}}
{{- define "tokensmith.podAnnotations" -}}
checksum/tokensmith-config: {{ include "tokensmith.configChecksum" . }}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.healthPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
The tokensmith container. Call with (dict "root" $ "role" "central|native|classic").
*/}}
{{- define "tokensmith.container" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $role := .role -}}
- name: tokensmith
  image: {{ include "tokensmith.image" $root | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if eq $role "native" }}
  # Native sidecar: an init container that keeps running for the pod's lifetime.
  restartPolicy: Always
  {{- end }}
  args: ["run", "--config", "/etc/tokensmith/config.yaml"]
  {{- if or $v.secretEnv $v.extraEnv (eq $role "central") }}
  env:
    {{- if eq $role "central" }}
    # the replica's name in the leader lease (shared state backend), shown by `status`
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    {{- end }}
    {{- range $v.secretEnv }}
    - name: {{ .name }}
      valueFrom:
        secretKeyRef:
          name: {{ .secretName }}
          key: {{ .key }}
          {{- if hasKey . "optional" }}
          optional: {{ .optional }}
          {{- end }}
    {{- end }}
    {{- range $v.extraEnv }}
    - name: {{ .name }}
      {{- if hasKey . "valueFrom" }}
      valueFrom:
        {{- toYaml .valueFrom | nindent 8 }}
      {{- else }}
      value: {{ .value | quote }}
      {{- end }}
    {{- end }}
  {{- end }}
  {{- with $v.secretEnvFrom }}
  envFrom:
    {{- range . }}
    - secretRef:
        name: {{ . }}
    {{- end }}
  {{- end }}
  ports:
    - name: http-metrics
      containerPort: {{ $v.healthPort }}
      protocol: TCP
  {{- if ne $role "central" }}
  # /readyz?strict=1 turns 200 once every client has its first token. For the
  # native sidecar this gates the app containers; for the classic one it only
  # delays liveness checks while the first tokens are fetched.
  startupProbe:
    httpGet:
      path: /readyz?strict=1
      port: http-metrics
    {{- toYaml $v.sidecar.startupProbe | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: http-metrics
    {{- toYaml $v.livenessProbe | nindent 4 }}
  # /readyz: serving (the daemon runs, its scheduler is alive). One client
  # without a token does not make the pod NotReady: that is for metrics/alerts.
  readinessProbe:
    httpGet:
      path: /readyz
      port: http-metrics
    {{- toYaml $v.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: tokensmith-config
      mountPath: /etc/tokensmith
      readOnly: true
    - name: tokensmith-state
      mountPath: /var/lib/tokensmith
    - name: tokensmith-runtime
      mountPath: /run/tokensmith
    - name: tokensmith-tmp
      mountPath: /tmp
    {{- if ne $role "central" }}
    - name: tokensmith-tokens
      mountPath: {{ $v.sidecar.tokenDir }}
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
Volumes of the tokensmith container. Everything it writes is in memory:
state holds refresh tokens, and the root filesystem is read-only.
*/}}
{{- define "tokensmith.volumes" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
- name: tokensmith-config
  configMap:
    name: {{ include "tokensmith.configMapName" $root }}
- name: tokensmith-state
  {{- if and (eq .role "central") $v.central.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "tokensmith.fullname" $root }}-state
  {{- else }}
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.stateVolumeSizeLimit }}
  {{- end }}
- name: tokensmith-runtime
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: tokensmith-tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- if ne .role "central" }}
- name: tokensmith-tokens
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.sidecar.tokenVolumeSizeLimit }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
======================== Sidecar API ========================

"tokensmith.sidecar" renders a mapping with everything an application pod
needs; merge its lists into the pod spec:

  {{- $ts := include "tokensmith.sidecar" . | fromYaml }}
  template:
    metadata:
      annotations: {{- toYaml $ts.podAnnotations | nindent 8 }}
    spec:
      initContainers: {{- toYaml $ts.initContainers | nindent 8 }}   # [] for classic
      containers:
        - name: app
          volumeMounts: {{- toYaml $ts.appVolumeMounts | nindent 12 }}
        {{- with $ts.containers }}{{ toYaml . | nindent 8 }}{{ end }}   # classic only
      volumes: {{- toYaml $ts.volumes | nindent 8 }}

From a parent chart that depends on this chart (mode: sidecar), pass the
subchart's context: include "tokensmith.sidecar" .Subcharts.tokensmith

Keys:
  initContainers   the native sidecar (restartPolicy: Always), else []
  containers       the classic sidecar container, else []
  volumes          tokensmith's volumes, incl. the shared in-memory token dir
  appVolumeMounts  read-only mount of the token dir for app containers
  podAnnotations   config checksum and Prometheus scrape annotations
  podLabels        the label the sidecar-mode PodMonitor selects
*/}}
{{- define "tokensmith.sidecar" -}}
{{- if ne .Values.mode "sidecar" }}
{{- fail "tokensmith.sidecar is only available with mode: sidecar" }}
{{- end }}
{{- $native := .Values.sidecar.native }}
{{- if and $native (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "sidecar.native needs Kubernetes >= 1.29 (this is %s); set sidecar.native: false for a classic sidecar" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- $container := include "tokensmith.container" (dict "root" . "role" (ternary "native" "classic" $native)) | fromYamlArray }}
initContainers: {{ ternary $container (list) $native | toJson }}
containers: {{ ternary (list) $container $native | toJson }}
volumes: {{ include "tokensmith.volumes" (dict "root" . "role" "sidecar") | fromYamlArray | toJson }}
appVolumeMounts:
  - name: tokensmith-tokens
    mountPath: {{ .Values.sidecar.tokenDir }}
    readOnly: true
podAnnotations:
  {{- include "tokensmith.podAnnotations" . | nindent 2 }}
podLabels:
  {{- include "tokensmith.sidecarPodLabels" . | nindent 2 }}
{{- end }}

{{/*
Label of the `helm test` pod; the NetworkPolicy lets it reach the health port.
*/}}
{{- define "tokensmith.testPodLabels" -}}
tokensmith/helm-test: {{ include "tokensmith.fullname" . }}
{{- end }}

{{/*
Non-empty when the config keeps state in a store shared by replicas (vault, dynamodb).
*/}}
{{- define "tokensmith.sharedState" -}}
{{- $state := .Values.config.state | default dict }}
{{- if has ($state.type | default "file") (list "vault" "dynamodb") }}true{{ end }}
{{- end }}
