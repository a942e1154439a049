{{/* Names are fixed (not release-prefixed) so the older project's commands keep working:
     namespace eni-controller-system, Deployment eni-controller. */}}
{{- define "eni-controller.name" -}}eni-controller{{- end -}}

{{- define "eni-controller.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "eni-controller.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aws-multi-eni
{{- end -}}

{{- define "eni-controller.selectorLabels" -}}
app.kubernetes.io/name: eni-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "eni-controller.serviceAccountName" -}}
{{- required "serviceAccount.name is required" .Values.serviceAccount.name -}}
{{- end -}}

{{- define "eni-controller.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Checks that stop a broken install before anything is applied. */}}
{{- define "eni-controller.validate" -}}
{{- $_ := required "clusterName is required: it tags every ENI this controller creates and scopes which ENIs it may adopt or delete. Set it to a name unique in the AWS account, e.g. --set clusterName=my-eks-cluster" .Values.clusterName -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "leaderElection.enabled=false requires replicaCount=1: several replicas without a leader would race on the same ENIs" -}}
{{- end -}}
{{- end -}}
