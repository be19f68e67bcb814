{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "tunnox.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Resource name prefix: fullnameOverride, else <release>-<chart> (or <release> when it already
contains the chart name).
*/}}
{{- define "tunnox.fullname" -}}
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

{{- define "tunnox.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "tunnox.labels" -}}
helm.sh/chart: {{ include "tunnox.chart" . }}
{{ include "tunnox.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tunnox
{{- end -}}

{{/* Selector labels shared by every component (add app.kubernetes.io/component). */}}
{{- define "tunnox.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tunnox.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is set (it wins), else repository:tag.
Usage: include "tunnox.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) */}}
{{- define "tunnox.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .tag .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Pull policy: the value when set; else IfNotPresent for a digest (immutable) and Always for a
tag (a tag can move, so the node checks the registry). */}}
{{- define "tunnox.pullPolicy" -}}
{{- if .pullPolicy -}}
{{- .pullPolicy -}}
{{- else if .digest -}}
IfNotPresent
{{- else -}}
Always
{{- end -}}
{{- end -}}

{{- define "tunnox.image" -}}
{{- include "tunnox.imageRef" (dict "image" .Values.image "tag" .Chart.AppVersion) -}}
{{- end -}}

{{/*
checkov suppressions (checkov's own mechanism: annotations on the workload), each with its reason;
listed in charts/tunnox/README.md. Usage: include "tunnox.checkovSkips" (list (list "CKV_K8S_43" "reason") ...)
*/}}
{{- define "tunnox.checkovSkips" -}}
{{- range $i, $s := . }}
checkov.io/skip{{ add1 $i }}: {{ printf "%s=%s" (index $s 0) (index $s 1) | quote }}
{{- end }}
{{- end -}}

{{/* The reason for skipping CKV_K8S_43 when an image has no digest. */}}
{{- define "tunnox.noDigestReason" -}}
the project publishes no image, so there is no digest to pin by default; set image.digest (redis.image.digest) to pin one
{{- end -}}

{{- define "tunnox.controller.fullname" -}}
{{- printf "%s-controller" (include "tunnox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tunnox.proxy.serviceAccountName" -}}
{{- printf "%s-proxy" (include "tunnox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tunnox.redis.fullname" -}}
{{- printf "%s-redis" (include "tunnox.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Redis address written into storage.redis.addr. */}}
{{- define "tunnox.redis.addr" -}}
{{- if .Values.redis.bundled -}}
{{- printf "%s.%s.svc:6379" (include "tunnox.redis.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.external.addr (or redis.external.sentinel.masterName) is required when redis.bundled is false" .Values.redis.external.addr -}}
{{- end -}}
{{- end -}}

{{/* Secret name and key holding the Redis password; empty name = no password. */}}
{{- define "tunnox.redis.secretName" -}}
{{- if .Values.redis.bundled -}}
{{- .Values.redis.existingSecret | default (include "tunnox.redis.fullname" .) -}}
{{- else -}}
{{- .Values.redis.external.passwordSecret.name -}}
{{- end -}}
{{- end -}}

{{- define "tunnox.redis.secretKey" -}}
{{- if .Values.redis.bundled -}}
password
{{- else -}}
{{- .Values.redis.external.passwordSecret.key | default "password" -}}
{{- end -}}
{{- end -}}

{{/* Where tunnox pods find the Redis password (a file from the Secret, never an env var). */}}
{{- define "tunnox.redis.passwordFile" -}}
/var/run/secrets/tunnox/redis/password
{{- end -}}

{{/* The volume holding the Redis password, when there is a Secret. */}}
{{- define "tunnox.redis.passwordVolume" -}}
{{- $secret := include "tunnox.redis.secretName" . -}}
{{- if $secret -}}
- name: redis-password
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
    items:
      - key: {{ include "tunnox.redis.secretKey" . }}
        path: password
{{- end }}
{{- end -}}

{{- define "tunnox.redis.passwordMount" -}}
{{- if include "tunnox.redis.secretName" . -}}
- name: redis-password
  mountPath: /var/run/secrets/tunnox/redis
  readOnly: true
{{- end }}
{{- $sentinel := .Values.redis.external.sentinel | default dict }}
{{- if and (not .Values.redis.bundled) $sentinel.masterName (($sentinel.passwordSecret | default dict).name) }}
- name: TUNNOX__STORAGE__REDIS__SENTINEL__PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $sentinel.passwordSecret.name }}
      key: {{ $sentinel.passwordSecret.key | default "password" }}
{{- end }}
{{- end -}}

{{/* The restricted container security context shared by the tunnox containers. */}}
{{- define "tunnox.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tunnox.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
The proxy sets with their derived names, as a list of dicts: name, business, region,
slug (<business>-<region>, "*" rendered "dr"), setLabel (<business>.<region>, "*" rendered
"dr"), replicas, resources. Fails on a duplicate set or one that collides after rendering.
Usage: (include "tunnox.proxy.sets" . | fromYaml).sets
*/}}
{{- define "tunnox.proxy.sets" -}}
{{- $out := list -}}
{{- $seen := dict -}}
{{- range $i, $s := .Values.proxy.sets -}}
{{- $parts := splitList "." $s.name -}}
{{- if ne (len $parts) 2 -}}
{{- fail (printf "proxy.sets[%d].name %q: expected <business>.<region>" $i $s.name) -}}
{{- end -}}
{{- $business := index $parts 0 -}}
{{- $region := index $parts 1 -}}
{{- $regionSlug := ternary "dr" $region (eq $region "*") -}}
{{- $setLabel := printf "%s.%s" $business $regionSlug -}}
{{- if hasKey $seen $setLabel -}}
{{- if eq $s.name (get $seen $setLabel) -}}
{{- fail (printf "proxy.sets[%d].name %q: this set is defined twice" $i $s.name) -}}
{{- end -}}
{{- fail (printf "proxy.sets[%d].name %q: clashes with set %q (region \"*\" is rendered \"dr\", so both would be %q)" $i $s.name (get $seen $setLabel) $setLabel) -}}
{{- end -}}
{{- $_ := set $seen $setLabel $s.name -}}
{{- $replicas := 2 -}}
{{- if hasKey $s "replicas" -}}{{- $replicas = $s.replicas -}}{{- end -}}
{{- $deployName := printf "%s-proxy-%s-%s" (include "tunnox.fullname" $) $business $regionSlug -}}
{{- if gt (len $deployName) 63 -}}
{{- fail (printf "proxy.sets[%d].name %q: resource name %q is longer than 63 characters; shorten the set name or set fullnameOverride" $i $s.name $deployName) -}}
{{- end -}}
{{- $out = append $out (dict "deployName" $deployName "serviceName" (printf "%s-proxy-%s" (include "tunnox.fullname" $) $business) "name" $s.name "business" $business "region" $region "regionSlug" $regionSlug "setLabel" $setLabel "slug" (printf "%s-%s" $business $regionSlug) "replicas" $replicas "resources" ($s.resources | default $.Values.proxy.resources | default dict) "limits" ($s.limits | default dict)) -}}
{{- end -}}
{{- toYaml (dict "sets" $out) -}}
{{- end -}}

{{/* Distinct businesses of the proxy sets (business, serviceName), in order of first appearance. */}}
{{- define "tunnox.proxy.businesses" -}}
{{- $out := list -}}
{{- $seen := list -}}
{{- range (include "tunnox.proxy.sets" . | fromYaml).sets -}}
{{- if not (has .business $seen) -}}
{{- $seen = append $seen .business -}}
{{- $out = append $out (dict "business" .business "serviceName" .serviceName) -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "businesses" $out) -}}
{{- end -}}

{{/* The Secret holding the proxies' node token (tunnel.nodeToken), given or generated. */}}
{{- define "tunnox.tunnel.nodeTokenSecret" -}}
{{- .Values.tunnel.nodeToken.secretName | default (printf "%s-node-token" (include "tunnox.fullname" .) | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/* Where the proxies find the tunnel listener's certificate and the node token (files from
Secrets, mounted read-only). */}}
{{- define "tunnox.tunnel.tlsDir" -}}
/var/run/secrets/tunnox/tunnel-tls
{{- end -}}
{{- define "tunnox.tunnel.nodeTokenDir" -}}
/var/run/secrets/tunnox/node
{{- end -}}

{{/* Check values the schema cannot express. */}}
{{- define "tunnox.validate" -}}
{{- if and .Values.tunnel.enabled (not .Values.tunnel.tls.secretName) (not .Values.tunnel.insecure) -}}
{{- fail "tunnel.enabled is true but tunnel.tls.secretName is empty: the tunnel listener needs a certificate (a kubernetes.io/tls Secret with tls.crt and tls.key; agents verify it). Set tunnel.tls.secretName, or tunnel.insecure=true for plain TCP on a network you trust" -}}
{{- end -}}
{{- if and .Values.tunnel.enabled .Values.tunnel.tls.secretName .Values.tunnel.insecure -}}
{{- fail "tunnel.insecure is true and tunnel.tls.secretName is set: choose one (the certificate would be ignored)" -}}
{{- end -}}
{{- if le (int .Values.proxy.terminationGracePeriodSeconds) (int .Values.proxy.drainSeconds) -}}
{{- fail (printf "proxy.terminationGracePeriodSeconds (%d) must be longer than proxy.drainSeconds (%d): after the drain, in-flight requests need time to finish" (int .Values.proxy.terminationGracePeriodSeconds) (int .Values.proxy.drainSeconds)) -}}
{{- end -}}
{{- if and .Values.https.acme.directoryUrl (not .Values.https.enabled) -}}
{{- fail "https.acme.directoryUrl is set but https.enabled is false: issued certificates are served by the HTTPS listener and sealed with https.storeKeySecret; enable HTTPS" -}}
{{- end -}}
{{- if and .Values.api.enabled (not .Values.api.tokensSecret.name) -}}
{{- fail "api.enabled is true but api.tokensSecret.name is empty: every API request needs a bearer token; create a Secret with one key per token and name it here" -}}
{{- end -}}
{{- if and .Values.api.enabled (not .Values.api.tokens) -}}
{{- fail "api.enabled is true but api.tokens is empty: name at least one key of api.tokensSecret and its role" -}}
{{- end -}}
{{- if and (not .Values.proxy.admin.trustLoopback) (not .Values.proxy.admin.tokenSecret.name) -}}
{{- fail "proxy.admin.trustLoopback is false but proxy.admin.tokenSecret.name is empty: the preStop hook could not drain; set a token Secret" -}}
{{- end -}}
{{- end -}}

{{/* The store key's volume mount (controller and proxies), when HTTPS is on. */}}
{{- define "tunnox.https.storeKeyMount" -}}
{{- if .Values.https.enabled -}}
- name: tls-store-key
  mountPath: /var/run/secrets/tunnox/tls-store
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The store key's volume: the Secret https.storeKeySecret names (required with HTTPS). */}}
{{- define "tunnox.https.storeKeyVolume" -}}
{{- if .Values.https.enabled -}}
- name: tls-store-key
  secret:
    secretName: {{ required "https.storeKeySecret.name is required with https.enabled" .Values.https.storeKeySecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.https.storeKeySecret.key | default "key" }}
        path: key
{{- end -}}
{{- end -}}

{{/* The namespace of the management API's HTTPDomainMapping resources. */}}
{{- define "tunnox.api.namespace" -}}
{{- .Values.api.namespace | default .Release.Namespace -}}
{{- end -}}
