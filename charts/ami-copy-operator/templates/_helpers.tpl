{{/* The release's full name, cut to the 63 characters of a DNS label. */}}
{{- define "ami-copy-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ami-copy-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ami-copy-operator.labels" -}}
{{ include "ami-copy-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "ami-copy-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ami-copy-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Leader election is on when asked for, and whenever there is more than one replica. */}}
{{- define "ami-copy-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "ami-copy-operator.leaseName" -}}
{{- default (include "ami-copy-operator.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/*
The spec of the default AmiCopyPolicy, as YAML: policy.default, or with
policy.trustAllNamespaces everything but public images. The operator gets
the same spec (--default-policy) for a namespace no policy selects, so that
a moment without the policy object (an upgrade replaces it) changes nothing.
*/}}
{{- define "ami-copy-operator.defaultPolicy" -}}
{{- $spec := deepCopy .Values.policy.default }}
{{- if .Values.policy.trustAllNamespaces }}
{{- $all := list "*" }}
{{- $trusted := dict
      "sourceOwners" $all
      "regions" $all
      "roles" (list (dict "arn" "*" "requireExternalId" false))
      "kmsKeys" $all
      "sharing" (dict "accounts" $all "organizations" $all "organizationalUnits" $all "snapshots" true "public" false) }}
{{- $spec = merge $trusted (pick $spec "maxDestinations") }}
{{- end }}
{{- toYaml $spec }}
{{- end }}
