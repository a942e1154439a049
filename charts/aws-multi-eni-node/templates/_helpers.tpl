{{/* Fixed names, as in the older project: DaemonSet eni-manager. */}}
{{- define "eni-manager.name" -}}eni-manager{{- end -}}

{{- define "eni-manager.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eni-manager.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aws-multi-eni
{{- end -}}

{{- define "eni-manager.selectorLabels" -}}
app.kubernetes.io/name: eni-manager
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eni-manager.serviceAccountName" -}}
{{- required "serviceAccount.name is required" .Values.serviceAccount.name -}}
{{- end -}}

{{- define "eni-manager.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Security context shared by the containers that only touch host paths as root. */}}
{{- define "eni-manager.rootNoCaps" -}}
runAsUser: 0
runAsNonRoot: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Comma-separated resource names served through DRA. */}}
{{- define "eni-manager.draResources" -}}
{{- $names := list -}}
{{- range .Values.dra.resources -}}
{{- $names = append $names (.resourceName | required "dra.resources[].resourceName is required") -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* The dra.resources entry with netdev: true (the ENIs left on ena), if any. */}}
{{- define "eni-manager.draNetdevResource" -}}
{{- $netdev := list -}}
{{- range .Values.dra.resources -}}
{{- if .netdev -}}
{{- $netdev = append $netdev .resourceName -}}
{{- end -}}
{{- end -}}
{{- if gt (len $netdev) 1 -}}
{{- fail "dra.resources: at most one entry may set netdev: true" -}}
{{- end -}}
{{- join "" $netdev -}}
{{- end -}}
